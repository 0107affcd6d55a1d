"""Which reader a benchmark name or a data path means, and where each of the seven sits under a data root."""

from __future__ import annotations

import re
from pathlib import Path

from . import ai2d, hallusionbench, mmbench, mmmu, mmstar, scienceqa, seed, shapes
from .item import BenchmarkError, EvalItem

# The release table's seven, in its column order.
GRACE7 = ("hallusionbench", "mmbench", "scienceqa", "ai2d", "mmmu", "seed", "mmstar")
READERS = {"hallusionbench": hallusionbench.read, "mmbench": mmbench.read, "scienceqa": scienceqa.read,
           "ai2d": ai2d.read, "mmmu": mmmu.read, "seed": seed.read, "mmstar": mmstar.read,
           "conversation": shapes.read_conversations}
BENCHMARKS = tuple(READERS) + ("shapes",)
TITLES = {"hallusionbench": "HallusionBench", "mmbench": "MMBench", "scienceqa": "ScienceQA", "ai2d": "AI2D",
          "mmmu": "MMMU", "seed": "SEED", "mmstar": "MMStar", "shapes": "shapes", "conversation": "conversation"}
_SPLIT_READERS = {"scienceqa", "mmmu"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def detect(path: Path) -> str | None:
    """The benchmark a file or folder holds, judged from its name and a look at its top level; None if unknown."""
    key = _key(path.name)
    for bench in ("hallusionbench", "mmbench", "scienceqa", "ai2d", "mmmu", "mmstar"):
        if key.startswith(bench):
            return bench
    if key.startswith("seed"):
        return "seed"
    if path.is_file():
        if path.suffix == ".tsv":
            return "mmbench"
        if path.suffix == ".json":
            if path.name == "problems.json" or (path.parent / "pid_splits.json").is_file():
                return "scienceqa"
            try:   # a peek, not a parse: training JSON files can be gigabytes
                with path.open(encoding="utf-8", errors="replace") as f:
                    head = f.read(4096).lstrip()
            except OSError:
                return None
            if head.startswith("["):
                return "conversation"
            return "seed" if head.startswith("{") and '"questions"' in head else None
        return None
    if path.is_dir():
        if (path / "problems.json").is_file() and (path / "pid_splits.json").is_file():
            return "scienceqa"
        if any(path.glob("*/validation-*.parquet")):
            return "mmmu"
        names = [p.name for p in path.glob("*.parquet")] + [p.name for p in path.glob("data/*.parquet")]
        if any(n.startswith(("image-", "non_image-")) for n in names):
            return "hallusionbench"
        if any(path.glob("SEED*.json")):
            return "seed"
    return None


def locate(root: Path, bench: str) -> Path:
    """The file or folder under a data root that holds `bench` (e.g. ROOT/MMBench_DEV_EN.tsv, ROOT/MMMU/)."""
    if not root.is_dir():
        raise BenchmarkError(f"{root} is not a folder: --data-root names the folder holding the seven benchmarks")
    found = sorted(p for p in root.iterdir() if detect(p) == bench and _key(p.name).startswith(_key(bench)[:4]))
    if not found:
        raise BenchmarkError(f"no {TITLES[bench]} under {root} (expected a file or folder named like '{TITLES[bench]}')")
    if len(found) > 1:
        raise BenchmarkError(f"several {TITLES[bench]} candidates under {root}: "
                             f"{', '.join(p.name for p in found)}; keep one")
    return found[0]


def read_benchmark(bench: str | None, data: str | Path, limit: int | None = None, split: str | None = None,
                   seed: int = 0) -> tuple[str, list[EvalItem]]:
    """(benchmark name, its questions) from the published files at `data`; `bench` None: judged from the path."""
    if str(data) in shapes.SPLITS and bench in (None, "shapes"):
        return "shapes", shapes.read_shapes(str(data), limit, seed)
    if bench == "shapes":
        raise BenchmarkError(f"the shapes benchmark is built in: give --data {' or '.join(shapes.SPLITS)}")
    path = Path(data).expanduser()
    if not path.exists():
        raise BenchmarkError(f"{path} does not exist")
    bench = bench or detect(path)
    if bench is None:
        raise BenchmarkError(f"cannot tell which benchmark {path} holds: name it with --bench")
    if bench not in READERS:
        raise BenchmarkError(f"unknown benchmark '{bench}': choose one of {', '.join(BENCHMARKS)}")
    if split and bench in _SPLIT_READERS:
        items = READERS[bench](path, limit, split=split)
    else:
        items = READERS[bench](path, limit)
    if not items:
        raise BenchmarkError(f"{path} holds no {TITLES[bench]} questions")
    return bench, items
