"""The machine's DRAM read bandwidth, the reference of every "% of bandwidth" and roofline in bench/.

    python bench/read_bandwidth.py [--threads N]

Best of two readers over 1 GiB, 5 tries each: torch's multi-threaded fp32 sum (one sequential stream per
thread), and a small C loop (compiled here with the system compiler; skipped without one) that reads each
thread's half as 1, 4 or 8 interleaved streams with software prefetch. On a 2-core Xeon guest with AMX one
stream per thread read 16-19 GB/s and four read 23-24 (its hardware prefetcher follows each 4 KB page on its
own), so a sum alone set the roofline too low and our bf16 GEMV (8 row streams) showed 110 % of it. Kernels are
judged against the fastest of these, never against a slower one.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from grace.quant import kernels

GIB = 1 << 30
STREAMS = (1, 4, 8)

_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <immintrin.h>
// each of nt threads reads its share of p as `streams` interleaved streams, 128 bytes from each in turn,
// prefetching 16 KB ahead in all; returns the OR of what it read so that nothing is optimised away
uint64_t grace_bench_read(const uint8_t *p, size_t bytes, int streams, int nt) {
    uint64_t res = 0;
#pragma omp parallel num_threads(nt) reduction(|:res)
    {
        int t = 0, n = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(); n = omp_get_num_threads();
#endif
        size_t share = bytes / n / streams / 128 * 128;
        const uint8_t *base = p + (size_t)t * share * streams;
        __m256i acc = _mm256_setzero_si256();
        for (size_t off = 0; off < share; off += 128)
            for (int s = 0; s < streams; s++) {
                const uint8_t *q = base + (size_t)s * share + off;
                _mm_prefetch((const char *)(q + 16384 / streams), _MM_HINT_T1);
                _mm_prefetch((const char *)(q + 16384 / streams + 64), _MM_HINT_T1);
                for (int o = 0; o < 128; o += 32) acc = _mm256_or_si256(acc, _mm256_loadu_si256((const __m256i *)(q + o)));
            }
        uint64_t w[4];
        _mm256_storeu_si256((__m256i *)w, acc);
        res |= w[0] | w[1] | w[2] | w[3];
    }
    return res;
}
"""


@functools.cache              # built once per process: linear_kernels.py and decode.py read before and after
def _c_reader():
    """The C reader as a ctypes function, or None (no compiler, a CPU without AVX2, a failed build)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if not compiler or kernels.isa() not in ("avx512", "avx2"):     # either branch of grace's kernels has AVX2
        return None
    tmp = Path(tempfile.mkdtemp(prefix="grace_bw_"))
    try:
        (tmp / "read.c").write_text("#include <omp.h>\n" + _SOURCE)
        subprocess.run([compiler, "-O2", "-mavx2", "-fopenmp", "-shared", "-fPIC", str(tmp / "read.c"), "-o",
                        str(tmp / "read.so")], check=True, capture_output=True, timeout=120)
        fn = ctypes.CDLL(str(tmp / "read.so")).grace_bench_read
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)       # the loaded library stays mapped
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_uint64
    return fn


def _best_gbs(fn, tries: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return GIB / best / 1e9


def read_bandwidth_detail() -> dict:
    """{"gbs": the best, "torch_sum": GB/s, "c_streams_<S>": GB/s per stream count (if the C reader built)}."""
    a = torch.ones(GIB // 4)
    out = {"torch_sum": _best_gbs(a.sum)}
    reader = _c_reader()
    if reader is not None:
        threads = torch.get_num_threads()
        for streams in STREAMS:
            out[f"c_streams_{streams}"] = _best_gbs(lambda: reader(a.data_ptr(), GIB, streams, threads))
    del a
    out["gbs"] = max(out.values())
    return out


def read_bandwidth() -> float:
    """GB/s: the fastest of the readers above."""
    return read_bandwidth_detail()["gbs"]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--threads":
        torch.set_num_threads(int(sys.argv[2]))
    for key, value in read_bandwidth_detail().items():
        print(f"{key}: {value:.1f} GB/s")
