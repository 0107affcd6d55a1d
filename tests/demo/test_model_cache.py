"""demo/model_cache.py: one copy of each model within a memory budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio")

from demo.model_cache import CacheError, ModelCache, process_memory  # noqa: E402


class FakeLoads:
    """Stands in for grace.load: a 'model' holds as many bytes as its folder's weights file (or `size`)."""

    def __init__(self, size: int = 100, delay: float = 0.0):
        self.size, self.delay, self.calls = size, delay, []

    def __call__(self, source):
        self.calls.append(source)
        time.sleep(self.delay)
        weights = Path(source) / "model.safetensors"
        return SimpleNamespace(source=source, weight_bytes=weights.stat().st_size if weights.is_file() else self.size)


def checkpoints(tmp_path: Path, **sizes: int) -> dict[str, str]:
    """Folders whose model.safetensors has the given size: what the cache reserves before loading."""
    folders = {}
    for name, size in sizes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * size)
        folders[name] = str(tmp_path / name)
    return folders


def test_cache_evicts_least_recently_used_within_its_budget(tmp_path):
    models = checkpoints(tmp_path, a=100, b=100, c=100)
    loads = FakeLoads()
    cache = ModelCache(250, load=loads)
    for name in ["a", "b", "a", "c"]:          # "a" was used after "b": "b" is the one to go
        with cache.use(models[name]) as model:
            assert model.source == models[name]
            assert cache.used_bytes <= 250
    assert [s for s, _, _ in cache.held()] == [models["a"], models["c"]]
    assert loads.calls == [models["a"], models["b"], models["c"]]
    assert cache.evictions == 1


def test_cache_loads_a_model_once_for_concurrent_users():
    loads = FakeLoads(delay=0.3)
    cache = ModelCache(1000, load=loads)
    seen = []

    def user():
        with cache.use("org/shared") as model:
            seen.append(model)

    threads = [threading.Thread(target=user) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads.calls == ["org/shared"] and len({id(m) for m in seen}) == 1


def test_cache_never_evicts_a_model_in_use_and_refuses_what_cannot_fit(tmp_path):
    models = checkpoints(tmp_path, a=100, b=100, huge=5000)
    cache = ModelCache(150, load=FakeLoads(), wait_s=0.5)
    with cache.use(models["a"]):
        with pytest.raises(CacheError, match="no room"):
            with cache.use(models["b"]):
                pass
        assert cache.is_loaded(models["a"])
    with cache.use(models["b"]):                 # "a" is idle now and makes room
        assert not cache.is_loaded(models["a"])
    with pytest.raises(CacheError, match="more than the whole model cache budget"):
        with cache.use(models["huge"]):
            pass


def test_a_model_of_unknown_size_is_not_kept_past_the_budget():
    cache = ModelCache(150, load=FakeLoads(size=100))      # Hub repo ids: size known only once loaded
    with cache.use("org/a"), cache.use("org/b"):           # both in use: over budget only while answering
        assert cache.used_bytes == 200
    assert cache.used_bytes <= 150


def test_cache_load_failures_reach_the_caller_and_leave_no_trace():
    def broken(source):
        from grace.errors import GraceLoadError

        raise GraceLoadError(f"{source} is corrupt")

    cache = ModelCache(1000, load=broken)
    with pytest.raises(Exception, match="corrupt"):
        with cache.use("x"):
            pass
    assert cache.held() == [] and cache.used_bytes == 0


def test_process_memory_is_the_resident_size():
    resident = process_memory()
    assert resident is None or 10**6 < resident < 10**12
