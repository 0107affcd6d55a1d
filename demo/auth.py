"""Login check for GRACE_AUTH that slows down repeated wrong passwords (per user name and overall)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 8.0
FORGET_AFTER_S = 600.0


class SlowedLogin:
    """Each wrong attempt doubles the wait before the next answer for that user name. Hand gradio
    `login.check` (a coroutine function: gradio awaits only those; an object with an async __call__
    would return an un-awaited coroutine, which is truthy, and let everyone in)."""

    def __init__(self, users: list[tuple[str, str]]):
        self.users = dict(users)
        self.failures: dict[str, tuple[int, float]] = {}   # user name -> (count, time of the last one)

    def delay(self, username: str) -> float:
        count, last = self.failures.get(username, (0, 0.0))
        if count == 0 or time.monotonic() - last > FORGET_AFTER_S:
            return 0.0
        return min(FIRST_DELAY_S * 2 ** (count - 1), MAX_DELAY_S)

    async def check(self, username: str, password: str) -> bool:
        await asyncio.sleep(self.delay(username))
        expected = self.users.get(username)
        ok = expected is not None and hmac.compare_digest(password.encode(), expected.encode())
        if ok:
            self.failures.pop(username, None)
        else:
            count = self.failures.get(username, (0, 0.0))[0] + 1
            self.failures[username] = (count, time.monotonic())
            if len(self.failures) > 10_000:   # bounded memory under a flood of invented names
                self.failures.clear()
            log.info("wrong login for %r (%d in a row)", username[:40], count)
        return ok
