"""An ASGI middleware that refuses request bodies over a limit before they are read into memory.

Gradio caps files sent to its upload route (`max_file_size`), but an image can also travel inside an
API call's JSON as a `data:` URL; this bounds those bodies too (413, with a plain message)."""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


class BodyLimit:
    def __init__(self, app, max_bytes: int, skip_prefixes: tuple[str, ...] = ()):
        self.app, self.max_bytes, self.skip = app, int(max_bytes), skip_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or any(scope.get("path", "").startswith(p) for p in self.skip):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refuse(scope, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise TooLarge
            return message

        try:
            return await self.app(scope, counted, send)
        except TooLarge:
            return await self.refuse(scope, send)

    async def refuse(self, scope, send):
        log.info("refused a request to %s: body over %d bytes", scope.get("path"), self.max_bytes)
        body = json.dumps({"error": f"The request is too big (over {self.max_bytes / 1e6:.0f} MB)."}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class TooLarge(Exception):
    pass


def request_limit(max_file_bytes: int) -> int:
    """Room for one image as base64 (4/3 of its bytes) plus the other fields of a call."""
    return max_file_bytes * 4 // 3 + 1_000_000
