"""The one `spaces.GPU` wrapper: on a ZeroGPU Space it attaches a GPU for the duration of a call (in a
worker process that may differ from call to call); elsewhere it returns the function unchanged.

Compare and Eval handlers are wrapped with `on_gpu`; nothing else in the app may touch CUDA, and the
main process never initialises it (ZeroGPU forbids that), so models are loaded on CPU at start-up
and moved inside the wrapped call.
"""

from __future__ import annotations

import os

try:
    import spaces
except ImportError:   # not on a Space, and `spaces` is not installed
    spaces = None

DURATION_S = 120


def zero_gpu() -> bool:
    """Running on a ZeroGPU Space (the `spaces` package sets this before the app starts)."""
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def on_gpu(fn=None, *, duration: int = DURATION_S):
    """Decorator: `@on_gpu` or `@on_gpu(duration=300)`."""
    def wrap(fn):
        return spaces.GPU(duration=duration)(fn) if spaces is not None else fn

    return wrap(fn) if fn is not None else wrap
