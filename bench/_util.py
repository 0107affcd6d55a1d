"""Shared helpers for the bench/ scripts: machine info, interleaved timing, tables, results files,
and how the benchmarks build INT8/INT4 models (`grace.quantize_` with `bench_config(bits)`).

Timing protocol (the machine these run on is usually shared and noisy):
  * before each round we wait (bounded) until other processes leave the CPUs idle, measure how
    many cores they used during the round, and keep only the quiet rounds when there are enough;
  * every variant being compared is timed in the same loop, interleaved A,B,C,B,C,A,... (the
    starting variant rotates each round so none always runs right after another);
  * each sample repeats the call enough times to last ~`target_s`, after one untimed call: without it
    a variant pays for the page faults of the large temporaries the previous variant left unmapped
    (on the KVM guests we use, first-touching 50 MB costs ~25 ms, more than many of the kernels);
  * we report the median sample per variant, and ratios as the median of the per-round ratios
    (variants in one round ran seconds apart, so they saw the same load).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = ROOT / "bench" / "results"

# -- machine ---------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    except OSError:
        pass
    return []


def code_version() -> dict:
    """The commit the library code was measured at, and whether grace/ had uncommitted changes."""
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "grace_dirty": bool(git("status", "--porcelain", "--", "grace"))}


def machine_info() -> dict:
    import transformers

    return {
        "code": code_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def machine_line(info: dict) -> str:
    return (f"{info['cpu_model']} ({info['cpu_count']} cores, {info['torch_cpu_capability']}), "
            f"torch {info['torch']} with {info['torch_threads']} threads, transformers {info['transformers']}; "
            f"load average at start {info['loadavg_at_start'][0]:.2f}")


def add_common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer shapes/repeats: a smoke run, not for quoting")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path (default bench/results/<name>.json)")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--max-wait", type=float, default=15.0,
                        help="seconds to wait, before each timing round, for other processes to leave the CPUs "
                             "idle (0: never wait)")


def apply_args(args) -> None:
    global MAX_WAIT_S
    if args.threads:
        torch.set_num_threads(args.threads)
    MAX_WAIT_S = args.max_wait


# -- timing ----------------------------------------------------------------------------------------

class CpuMonitor:
    """CPU used by *other* processes (in cores), from /proc/stat minus this process's own CPU time."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ok = Path("/proc/stat").is_file()

    def _read(self):
        if not self.ok:
            return None
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = sum(vals) - vals[3] - vals[4]            # all but idle and iowait, in jiffies
        return busy / self.hz, time.process_time(), time.perf_counter()

    def start(self):
        return self._read()

    def others(self, since) -> float:
        """Average number of cores busy with other processes since `since`."""
        now = self._read()
        if since is None or now is None or now[2] <= since[2]:
            return 0.0
        return max(0.0, ((now[0] - since[0]) - (now[1] - since[1])) / (now[2] - since[2]))

    def wait_quiet(self, max_wait_s: float, threshold: float = 0.25, probe_s: float = 0.2) -> float:
        """Sleep until other processes use < `threshold` cores over a probe (at most `max_wait_s`);
        returns the seconds waited."""
        waited = 0.0
        while self.ok and waited < max_wait_s:
            mark = self.start()
            time.sleep(probe_s)
            waited += probe_s
            if self.others(mark) < threshold:
                break
        return waited


MONITOR = CpuMonitor()
MAX_WAIT_S = 15.0
QUIET_CORES = 0.25        # a round counts as quiet when other processes used less than this many cores


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, target_s: float = 0.02,
                     warmup: int = 2, max_inner: int = 2000, max_wait_s: float | None = None) -> tuple[dict[str, list[float]], dict]:
    """Seconds per call of each fn: `rounds` samples each, the fns interleaved within every round.

    Before each round we wait (up to `max_wait_s`) for the other processes on the machine to go
    quiet, and we measure how busy they were during the round; if enough rounds were quiet only
    those are returned. Returns (samples, load info)."""
    names = list(fns)
    inner = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        start = time.perf_counter()
        fns[name]()
        once = time.perf_counter() - start
        inner[name] = max(1, min(max_inner, int(target_s / max(once, 1e-7))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    others: list[float] = []
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            MONITOR.wait_quiet(MAX_WAIT_S if max_wait_s is None else max_wait_s)
            mark = MONITOR.start()
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn, k = fns[name], inner[name]
                fn()        # untimed: the allocator / caches in the state this fn leaves them (steady state)
                start = time.perf_counter()
                for _ in range(k):
                    fn()
                samples[name].append((time.perf_counter() - start) / k)
            others.append(MONITOR.others(mark))
    finally:
        if was_enabled:
            gc.enable()
    quiet = [i for i, o in enumerate(others) if o < QUIET_CORES]
    keep = quiet if len(quiet) >= max(3, rounds // 3) else list(range(rounds))
    out = {n: [v[i] for i in keep] for n, v in samples.items()}
    load = {"rounds": rounds, "rounds_kept": len(keep), "quiet_rounds": len(quiet),
            "others_cores_median_kept": statistics.median(others[i] for i in keep)}
    return out, load


def load_note(load: dict) -> str:
    return (f"  [{load['rounds_kept']}/{load['rounds']} rounds kept, {load['quiet_rounds']} quiet; "
            f"others used {load['others_cores_median_kept']:.2f} cores]")


def summary(samples: list[float]) -> dict:
    qs = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "q1_s": qs[0], "q3_s": qs[2], "min_s": min(samples),
            "n": len(samples)}


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (e.g. baseline time / variant time = speedup)."""
    return statistics.median(a / b for a, b in zip(num, den))


@contextlib.contextmanager
def patched(module, name: str, value):
    """Temporarily set a module-level constant (e.g. a kernel/dequant threshold) read at call time."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# -- output ----------------------------------------------------------------------------------------

def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return v if isinstance(v, str) else f"{v}"
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.1f}" if ms >= 10 else f"{ms:.2f}"


def write_results(name: str, payload: dict, out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("machine", machine_info())
    payload["machine"]["loadavg_at_end"] = list(os.getloadavg())
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


# -- quantized modules -------------------------------------------------------------------------------

def bench_config(bits: int):
    """How the benchmarks quantize a model with `grace.quantize_`: int4 round-to-nearest with per-group
    zero points from each group's min/max (the transformers AWQ convention), int8 symmetric absmax."""
    from grace.quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return Int4WeightOnlyConfig(symmetric=False) if bits == 4 else Int8WeightOnlyConfig()


def decoder_linear_names(model: nn.Module) -> list[str]:
    """What `grace.quantize_` targets by default: on Qwen3-VL, the language model's decoder linears
    (q/k/v/o/gate/up/down; not visual, merger, lm_head or embeddings)."""
    from grace.quant import target_linears

    return target_linears(model)


def random_int4(in_features: int, out_features: int, group_size: int = 128, dtype=torch.bfloat16,
                seed: int = 0, bias: bool = False):
    """Int4Linear with uniformly random codes, zero points in [0, 15] and scales ~ a bf16 weight's (0.02 std)."""
    from grace.quant import Int4Linear

    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.uint8)
    scales = (0.5 + torch.rand(out_features, groups, generator=g)) * 0.006
    zeros = torch.randint(0, 16, (out_features, groups), generator=g).float()
    return Int4Linear.from_codes(codes, scales, zeros, bias=torch.zeros(out_features) if bias else None,
                                 group_size=group_size, dtype=dtype)


def random_int8(in_features: int, out_features: int, group_size: int = 128, dtype=torch.bfloat16,
                seed: int = 0, bias: bool = False):
    """Int8Linear with uniformly random codes in [-128, 127] and scales ~ a bf16 weight's."""
    from grace.quant import Int8Linear

    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(-128, 128, (out_features, in_features), generator=g, dtype=torch.int16)
    scales = (0.5 + torch.rand(out_features, groups, generator=g)) * 0.0005
    return Int8Linear.from_codes(codes, scales, bias=torch.zeros(out_features) if bias else None,
                                 group_size=group_size, dtype=dtype)
