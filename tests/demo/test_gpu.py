"""demo/gpu.py: the ZeroGPU flow simulated on CPU. On a ZeroGPU Space the models are loaded on CPU at
start-up, only @spaces.GPU functions see the GPU (possibly in another process, which gets the tensors
moved behind the modules' backs), and CUDA is never initialised in the main process."""

from __future__ import annotations

import importlib
import sys
import threading
import types

import pytest
import torch
from PIL import Image

pytest.importorskip("gradio")

from app_server import DEV_FAMILY, REPO  # noqa: E402


def move_behind_its_back(model: torch.nn.Module, device: str) -> None:
    """What ZeroGPU does on entering a GPU call: every tensor replaced by a copy, no Module.to()."""
    for sub in model.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in list(store.items()):
                if t is not None:
                    moved = t.detach().to(device).clone()
                    store[name] = torch.nn.Parameter(moved, requires_grad=False) \
                        if isinstance(t, torch.nn.Parameter) else moved


@pytest.fixture
def zero_gpu(monkeypatch):
    """A stand-in `spaces` package: GPU(duration) runs each call in a fresh worker thread after moving every
    held model's tensors, as the real one does in its GPU worker."""
    calls, held = [], []

    def GPU(duration=60):
        def wrap(fn):
            def call(*args, **kwargs):
                calls.append(fn.__name__)
                for model in held:
                    move_behind_its_back(model, "cpu")
                out = {}

                def worker():
                    result = fn(*args, **kwargs)
                    out["result"] = list(result) if isinstance(result, types.GeneratorType) else result

                thread = threading.Thread(target=worker)
                thread.start()
                thread.join()
                return out["result"]
            call.zero_gpu = True
            return call
        return wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    import demo
    import demo.compare_tab
    import demo.gpu

    def reload_app_modules():   # the wrappers are chosen at import time, as on a Space
        importlib.reload(demo.gpu)
        importlib.reload(demo.compare_tab)
        importlib.reload(demo)

    reload_app_modules()
    monkeypatch.setattr(demo.gpu, "GPU_DEVICE", "cpu")      # the real `spaces` defers .to("cuda") instead
    yield demo.gpu, calls, held
    monkeypatch.undo()
    reload_app_modules()


def test_zero_gpu_flow_preloads_on_cpu_and_answers_inside_gpu_calls(zero_gpu, fixtures_dir, tmp_path):
    gpu, calls, held = zero_gpu
    from demo import build_app
    from demo.families import build_registry
    from demo.model_cache import ModelCache
    from demo.settings import Settings

    settings = Settings.from_env({"GRACE_FIXTURES": str(fixtures_dir), "GRACE_ZOO": str(tmp_path / "none"),
                                  "GRACE_HUB": "off", "GRACE_TRAIN": "0", "SPACES_ZERO_GPU": "true"})
    assert settings.preload
    registry = build_registry(settings)
    cache = ModelCache(settings.cache_bytes, load=gpu.zero_gpu_loader)
    preloaded = gpu.preload(registry, cache)
    assert len(preloaded) == 3 and cache.loads == 3                  # at start-up, before any request
    assert all(loaded.device.type == "cpu" for _, loaded in ((s, cache._entries[s].loaded) for s in preloaded))
    held += [cache._entries[s].loaded.model for s in preloaded]

    app = build_app(settings, registry, cache)
    compare = next(fn for fn in app.fns.values() if fn.api_name == "compare").fn
    evaluate = next(fn for fn in app.fns.values() if fn.api_name == "evaluate").fn
    assert getattr(compare, "zero_gpu", False) and getattr(evaluate, "zero_gpu", False)   # Eval wrapped too

    image = Image.open(REPO / "assets" / "examples" / "red-circle-blue-square.png").convert("RGB")
    for _ in range(2):   # each call gets freshly moved tensors; the packed INT4 / INT8 columns still answer
        result = compare(DEV_FAMILY, "", image, "What color is the circle?", 6, False, 0.7, 0.9, 0)
        assert [c["status"] for c in result["columns"]] == ["done"] * 3, [c["error"] for c in result["columns"]]
    assert calls == ["run_api", "run_api"] and cache.loads == 3      # nothing reloaded inside the calls
    assert not torch.cuda.is_initialized()                           # the main process never touched CUDA
