"""The one `spaces.GPU` wrapper: on a ZeroGPU Space it attaches a GPU for the duration of a call (in a
worker process that may differ from call to call); elsewhere it returns the function unchanged.

Compare and Eval handlers are wrapped with `on_gpu`; nothing else in the app may touch CUDA, and the
main process never initialises it (ZeroGPU forbids that), so models are loaded on CPU at start-up
and moved inside the wrapped call.
"""

from __future__ import annotations

import logging
import os

try:
    import spaces
except ImportError:   # not on a Space, and `spaces` is not installed
    spaces = None

DURATION_S = 120
GPU_DEVICE = "cuda"   # where ZeroGPU puts the models inside a call (tests simulate it on "cpu")

log = logging.getLogger(__name__)


def zero_gpu() -> bool:
    """Running on a ZeroGPU Space (the `spaces` package sets this before the app starts)."""
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def on_gpu(fn=None, *, duration: int = DURATION_S):
    """Decorator: `@on_gpu` or `@on_gpu(duration=300)`."""
    def wrap(fn):
        return spaces.GPU(duration=duration)(fn) if spaces is not None else fn

    return wrap(fn) if fn is not None else wrap


def zero_gpu_loader(source: str):
    """ZeroGPU: load on CPU in the main process, then `.to("cuda")`, which `spaces` records and replays in
    each GPU call (moving the tensors itself; packed modules repack at their first forward there)."""
    import grace

    loaded = grace.load(source, device="cpu")
    loaded.model.to(GPU_DEVICE)
    return loaded


def preload(registry, cache) -> list[str]:
    """Load the default family's default columns into the cache now, at start-up; returns what loaded."""
    family = registry.get(registry.default)
    loaded = []
    for label in family.default_labels:
        source = family.variant(label).source
        try:
            with cache.use(source):
                loaded.append(source)
        except Exception as err:  # noqa: BLE001 - the column shows the error when asked
            log.warning("could not preload %s: %s", source, err)
    return loaded
