"""GRACE Gradio app: `python app.py` serves it on 127.0.0.1:7860; on a Hugging Face Space this is the entry point.

Settings come from environment variables (see demo/settings.py and the README); the options below
override them. Models load only from the app's own families: the operator adds families or local
folders here or through GRACE_FAMILIES / GRACE_ALLOW_LOCAL, never the browser.
"""

from __future__ import annotations

try:   # on a ZeroGPU Space `spaces` must be imported before torch; elsewhere it is optional
    import spaces  # noqa: F401
except ImportError:
    pass

import argparse
import logging
import os
import signal
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="address to bind (env GRACE_HOST; default 127.0.0.1, 0.0.0.0 on a Space)")
    parser.add_argument("--port", type=int, help="port (env GRACE_PORT; default 7860)")
    parser.add_argument("--family", action="append", default=[], metavar="NAME=label:path,...",
                        help="add a model family (folders or Hub repo ids); repeatable")
    parser.add_argument("--allow-local", action="append", default=[], metavar="DIR", type=Path,
                        help="offer the checkpoints in DIR as a family and its *.json files as training data")
    parser.add_argument("--default-family", help="family selected when the page opens")
    parser.add_argument("--hub", choices=["auto", "on", "off"], help="offer the Hub releases (env GRACE_HUB)")
    parser.add_argument("--cache-bytes", help="model cache budget, e.g. 6e9 or 4GiB (env GRACE_CACHE_BYTES)")
    parser.add_argument("--device", help="device to load models on (env GRACE_DEVICE)")
    parser.add_argument("--share", action="store_true", help="open a public share link (off by default)")
    parser.add_argument("--no-train", action="store_true", help="leave out the Train tab")
    return parser.parse_args(argv)


def make_settings(args: argparse.Namespace):
    from demo.settings import Settings, parse_bytes, parse_family_option

    settings = Settings.from_env()
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    for option in args.family:
        name, variants = parse_family_option(option)
        settings.families[name] = variants
    settings.allow_local += args.allow_local
    settings.default_family = args.default_family or settings.default_family
    settings.hub = args.hub or settings.hub
    if args.cache_bytes:
        settings.cache_bytes = parse_bytes(args.cache_bytes)
    settings.device = args.device or settings.device
    settings.share = args.share or settings.share
    settings.train = settings.train and not args.no_train
    return settings


def on_gpu_machine() -> bool:
    """A GPU is there (or a ZeroGPU Space attaches one per call). Called at startup, never at import."""
    if os.environ.get("SPACES_ZERO_GPU"):
        return True
    import torch

    return torch.cuda.is_available()


def stop_on_signals(manager) -> None:
    """SIGTERM (a Space or systemd stopping the app) and SIGINT: stop the training job, then exit."""
    def handle(signum, _frame):
        logging.getLogger("app").info("%s: stopping the training job and exiting", signal.Signals(signum).name)
        if manager is not None:
            manager.shutdown()
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from demo.settings import SettingsError

    try:
        settings = make_settings(parse_args(argv))
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from gradio.utils import get_upload_folder

    from demo import CSS, THEME, build_app
    from starlette.middleware import Middleware

    from demo.auth import SlowedLogin
    from demo.body_limit import BodyLimit, request_limit
    from demo.cleanup import start_cleaner
    from demo.families import build_registry
    from demo.gpu import preload, zero_gpu, zero_gpu_loader
    from demo.model_cache import ModelCache
    from demo.validate import limit_pixels

    limit_pixels(settings.max_image_pixels)
    try:
        registry = build_registry(settings, on_gpu=on_gpu_machine())
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    if not registry.names():
        print(f"error: no models to serve: no offline zoo in {settings.zoo_dir}, no fixtures in "
              f"{settings.fixtures_dir}, Hub not offered. Build the zoo (`python -m grace zoo`) or pass --family.",
              file=sys.stderr)
        return 2
    cache = ModelCache(settings.cache_bytes, device=settings.device, load=zero_gpu_loader if zero_gpu() else None)
    if settings.preload:
        preload(registry, cache)
    demo = build_app(settings, registry, cache)
    manager = demo.train_manager
    stop_on_signals(manager)
    start_cleaner(settings, Path(get_upload_folder()), manager.active_run if manager else lambda: None)
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    try:
        demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                    auth=SlowedLogin(settings.auth).check if settings.auth else None,
                    max_file_size=settings.max_file_bytes, css=CSS, theme=THEME, show_error=False,
                    allowed_paths=[str(settings.examples_dir)],
                    app_kwargs={"middleware": [Middleware(BodyLimit, max_bytes=request_limit(settings.max_file_bytes),
                                                          skip_prefixes=("/gradio_api/upload",))]})
    finally:
        if manager is not None:
            manager.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
