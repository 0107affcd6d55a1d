"""One loaded copy of each model, shared by every user, within a memory budget (least recently used evicted).

`with cache.use(source) as loaded:` loads on first use (other requests for the same model wait
for that one load instead of starting their own) and pins the model while it answers. Idle models
are evicted, least recently used first, to make room; a model in use is never evicted. Before a
local checkpoint loads, room is reserved for its size on disk, so concurrent loads cannot push the
cache past its budget; the Hub releases' size is only known once loaded, and idle models are then
evicted until the budget holds again.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)


class CacheError(RuntimeError):
    """A model cannot be held within the budget (too big, or the budget is full of models in use)."""


@dataclass
class _Entry:
    loaded: object           # grace.LoadedModel
    nbytes: int
    users: int = 0
    evict_when_idle: bool = False


def disk_bytes(source: str) -> int:
    """Size of a local checkpoint's weights on disk (0 when unknown, e.g. a Hub repo id)."""
    folder = Path(source)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.glob("*.safetensors") if not f.name.startswith("expected"))


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class ModelCache:
    def __init__(self, budget_bytes: int, load: Callable[[str], object] | None = None,
                 device: str | None = None, wait_s: float = 120.0):
        self.budget = int(budget_bytes)
        self._load = load or self._grace_load
        self._device = device
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()   # least recently used first
        self._loading: dict[str, int] = {}                        # source -> bytes reserved
        self.loads = 0
        self.evictions = 0

    def _grace_load(self, source: str):
        import grace

        return grace.load(source, device=self._device)

    # -- what is held --------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        with self._cond:
            return sum(e.nbytes for e in self._entries.values())

    def is_loaded(self, source: str) -> bool:
        with self._cond:
            return source in self._entries

    def held(self) -> list[tuple[str, int, int]]:
        """(source, bytes, users) of each held model, least recently used first."""
        with self._cond:
            return [(s, e.nbytes, e.users) for s, e in self._entries.items()]

    def summary(self) -> str:
        held = self.held()
        return (f"Model cache: {len(held)} loaded, {human_bytes(sum(b for _, b, _ in held))} of "
                f"{human_bytes(self.budget)} budget")

    # -- using a model -------------------------------------------------------------------------------

    @contextmanager
    def use(self, source: str) -> Iterator[object]:
        loaded = self._acquire(source)
        try:
            yield loaded
        finally:
            self._release(source)

    def _acquire(self, source: str):
        deadline = time.monotonic() + self._wait_s
        with self._cond:
            while True:
                entry = self._entries.get(source)
                if entry is not None:
                    entry.users += 1
                    self._entries.move_to_end(source)
                    return entry.loaded
                if source not in self._loading:
                    break
                self._wait(deadline, f"waiting for another request to finish loading {source}")
            need = disk_bytes(source)
            if need > self.budget:
                raise CacheError(f"{source} needs about {human_bytes(need)}, more than the whole model cache "
                                 f"budget ({human_bytes(self.budget)}); raise GRACE_CACHE_BYTES")
            while self._held_and_reserved() + need > self.budget:
                if not self._evict_one():
                    self._wait(deadline, f"no room to load {source}: the memory budget is full of models "
                                         "answering other requests")
            self._loading[source] = need
        try:
            started = time.perf_counter()
            loaded = self._load(source)   # grace.load serialises the model building itself
            log.info("loaded %s in %.1f s", source, time.perf_counter() - started)
        except BaseException:
            with self._cond:
                del self._loading[source]
                self._cond.notify_all()
            raise
        with self._cond:
            del self._loading[source]
            entry = _Entry(loaded, int(loaded.weight_bytes), users=1)
            self._entries[source] = entry
            self.loads += 1
            while self._held_and_reserved() > self.budget and self._evict_one(keep=source):
                pass
            # Bigger than announced and nothing idle left to evict: serve this request, then let it go.
            entry.evict_when_idle = self._held_and_reserved() > self.budget
            self._cond.notify_all()
            return loaded

    def _release(self, source: str) -> None:
        with self._cond:
            entry = self._entries.get(source)
            if entry is None:
                return
            entry.users -= 1
            if entry.users == 0 and entry.evict_when_idle:
                self._drop(source)
            self._cond.notify_all()

    # -- internals (call with the lock held) ---------------------------------------------------------

    def _held_and_reserved(self) -> int:
        return sum(e.nbytes for e in self._entries.values()) + sum(self._loading.values())

    def _evict_one(self, keep: str | None = None) -> bool:
        for source, entry in self._entries.items():   # oldest first
            if entry.users == 0 and source != keep:
                self._drop(source)
                return True
        return False

    def _drop(self, source: str) -> None:
        del self._entries[source]
        self.evictions += 1
        log.info("evicted %s from the model cache", source)
        gc.collect()
        try:
            import torch

            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _wait(self, deadline: float, why: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or not self._cond.wait(timeout=left) and time.monotonic() >= deadline:
            raise CacheError(f"{why}; gave up after {self._wait_s:.0f} s, please try again")


def process_memory() -> int | None:
    """Resident memory of the whole server process now (Linux /proc; None elsewhere)."""
    try:
        import os

        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
