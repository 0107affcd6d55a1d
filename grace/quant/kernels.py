"""CPU kernels for decode and prefill: GEMVs for bf16, group-wise int8 and group-wise int4 weights (a few
activation rows), GEMMs for the quantized weights (more rows), the attention of one query token and RMSNorm
of a few rows (used by grace/cpu_decode.py).

At M = 1 torch's bf16 `F.linear` goes through oneDNN, which moves weights at well under half the
machine's read bandwidth, and torch has no group-wise int8 kernel at all. The kernels here
(kernels_src.py: AVX-512 with BF16 dot products, or on CPUs without them AVX2 with fp32 FMAs, `isa()`; OpenMP on
torch's own thread pool) read each weight
byte once, accumulate in fp32 and apply the group scales exactly as the modules' `dequantize()`
defines them. The quantized weights are held in tiles of 8 output rows that are one contiguous
stream in memory (Int8Linear / Int4Linear layout "tiled"): read row by row, 8 rows were 8 streams
and the GEMVs moved under half the read bandwidth; tiled, they move about twice as much. For more
rows (a prompt's prefill) the pair GEMM dequantizes 32 output rows at a time, bit-identical to
`dequantize()`, into the layout of the bf16 dot product and runs at its peak (INT8 at 8-16 rows first
takes a tile GEMM over 8-row tiles); on a CPU with AMX the AMX GEMM takes their place (the same
dequantized weights, met by the tile unit); for very many rows the modules dequantize into a bf16
buffer for torch's bf16 GEMM. The GEMVs write fp32 or, for a module's bias-free decode step, bf16 directly
(the same rounding as `.to(torch.bfloat16)`, one op less per linear).

The library is compiled at first use with the system C compiler (`cc -O3 -march=native -fopenmp`,
about a second) into ~/.cache/grace/kernels (GRACE_KERNEL_CACHE overrides), keyed by source and CPU.
Without a compiler, on a CPU with neither AVX-512 BF16 nor AVX2 + FMA, or with GRACE_CPU_KERNELS=0, `available()` is
False and every module falls back to torch's kernels. No flag is flipped anywhere: the calls are
plain functions, safe from any thread (ctypes releases the GIL while they run).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .kernels_src import SOURCE, VERSION

log = logging.getLogger("grace")
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_TRIED = False
_AMX = False
_ISA = ""
# either branch of kernels_src.py: AVX-512 with BF16 dot products, or AVX2 with FMA (no tile / pair / AMX GEMM)
_ISA_FLAGS = {"avx512": {"avx512f", "avx512bw", "avx512_bf16"}, "avx2": {"avx2", "fma"}}
_AMX_FLAGS = {"amx_tile", "amx_bf16", "amx_int8"}
# the dequantize-then-GEMM path dequantizes at most this many weights at a time into a buffer each thread
# reuses (32 MB): every 2B decoder linear in one piece. Dequantizing costs ~6 % of the many-row GEMM that
# follows, while cutting the GEMM into pieces that stay in L3 (4 MB) cost it up to 17 % (down_proj at 256 rows:
# 336-row pieces, 17.6 ms vs 15.0 ms whole), so the pieces are as large as memory allows
SCRATCH_ELEMENTS = 1 << 24
# weights smaller than this stay on torch's kernels: their lower per-call cost wins on tiny models
# (a 2-layer, 128-wide zoo model answered 1.4x slower through these kernels); every 2B linear is larger
MIN_WEIGHTS = 1 << 20
_local = threading.local()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    base = os.environ.get("GRACE_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "grace", "kernels")
    return Path(base)


_P, _I, _T, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_GEMV = [_P, _P, _P, _P, _I, _I, _I, _I, _T, _T]        # x, codes, params, y, M, N, K, group, threads, bf16 out
_MANY = [_P, _P, _P, _P, _P, _T, _I, _I, _I, _T, _T]    # x, codes[], params[], y[], N[], count, M, K, group, threads, bf16
_DEQUANT = [_P, _P, _P, _I, _I, _I, _I, _I, _T, _T]     # codes, params, out, N, K, group, start, rows, threads, stream
# every library function: its argument types (all return void)
_SIGNATURES = {
    "grace_gemv_bf16": [_P, _P, _P, _I, _I, _I, _T, _T], "grace_gemv_bf16_many": [_P, _P, _P, _P, _T, _I, _T, _T],
    "grace_gemv_int8": _GEMV, "grace_gemv_int4": _GEMV, "grace_gemv_int8_many": _MANY, "grace_gemv_int4_many": _MANY,
    "grace_tile_gemm_int8": _GEMV, "grace_pair_gemm_int8": _GEMV, "grace_pair_gemm_int4": _GEMV,
    "grace_amx_gemm_int8": _GEMV, "grace_amx_gemm_int4": _GEMV, "grace_amx_gemv_int8": _GEMV,
    "grace_amx_gemv_int4": _GEMV, "grace_amx_gemv_int8_many": _MANY, "grace_amx_gemv_int4_many": _MANY,
    "grace_dequant_int8": _DEQUANT, "grace_dequant_int4": _DEQUANT,
    "grace_attention_decode": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, _F, _T],
    "grace_rms_norm": [_P, _P, _P, _I, _I, _F],
    "grace_qk_norm_rope": [_P, _P, _P, _P, _P, _P, _F, _F, _P, _P, _I, _I, _I, _I],
}


def _build() -> ctypes.CDLL | None:
    if os.environ.get("GRACE_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags = _cpu_flags()
    if not any(needed <= flags for needed in _ISA_FLAGS.values()):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        log.info("grace: no C compiler found; using torch's CPU kernels")
        return None
    # GRACE_CPU_ISA=avx2 builds the AVX2 branch on an AVX-512 CPU too (to test it, or to compare the two)
    isa_flags = ["-mno-avx512f"] if os.environ.get("GRACE_CPU_ISA") == "avx2" else []
    key = hashlib.sha256("\n".join([SOURCE, compiler, " ".join(sorted(flags)), torch.__version__]
                                    + isa_flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"grace_kernels_{key}.so"
    without_amx = target.with_name(target.stem + "_no_amx.so")
    says = log.warning if _AMX_FLAGS <= flags else log.info      # only an AMX CPU loses by it
    if not target.is_file() and without_amx.is_file():
        says("grace: using the CPU kernels built without the AMX GEMM after a failed build; delete %s to "
                    "try the full build again", without_amx)
        target = without_amx
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "grace_kernels.c"
                src.write_text(SOURCE)
                built = Path(tmp) / "grace_kernels.so"
                command = [compiler, "-O3", "-march=native", *isa_flags, "-fopenmp", "-shared", "-fPIC", str(src), "-o",
                           str(built)]
                try:
                    subprocess.run(command, check=True, capture_output=True, timeout=300)
                except subprocess.CalledProcessError as err:
                    # an older compiler or assembler without AMX: everything else still builds. Cached under its
                    # own name, and said at every load, so that a passing failure does not turn AMX off unseen
                    says("grace: building the CPU kernels failed (%s); retrying without the AMX GEMM",
                                (err.stderr or b"").decode(errors="replace")[:300])
                    subprocess.run(command + ["-DGRACE_NO_AMX"], check=True, capture_output=True, timeout=300)
                    target = without_amx
                partial = target.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(built, partial)
                os.replace(partial, target)          # atomic: concurrent builders never see a half-written file
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            log.warning("grace: could not build the CPU kernels (%s %s); using torch's kernels", err,
                        detail.decode(errors="replace")[:500])
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        log.warning("grace: could not load %s (%s); using torch's kernels", target, err)
        return None
    if lib.grace_kernels_version() != VERSION:
        return None
    global _AMX, _ISA
    _ISA = "avx512" if lib.grace_kernels_isa() == 512 else "avx2"
    _AMX = os.environ.get("GRACE_AMX", "1") != "0" and _AMX_FLAGS <= flags and lib.grace_amx_ready() == 1
    for name, argtypes in _SIGNATURES.items():
        if not hasattr(lib, name):
            continue                                 # the AVX2 build has no GEMMs, one with GRACE_NO_AMX no AMX GEMM
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


def library() -> ctypes.CDLL | None:
    global _LIB, _TRIED
    if not _TRIED:
        with _LOCK:
            if not _TRIED:
                _LIB = _build()
                _TRIED = True
    return _LIB


def available() -> bool:
    """True when the compiled kernels can run on this machine (built at the first call)."""
    return library() is not None


def isa() -> str:
    """Which build runs: "avx512" (AVX-512 BF16: GEMVs, tile / pair / AMX GEMMs), "avx2" (AVX2 + FMA: the GEMVs,
    dequantizers and decode kernels; more rows dequantize for torch's GEMM), or "" (no kernels)."""
    return _ISA if available() else ""


def amx() -> bool:
    """True when the many-row GEMMs run on the CPU's AMX tile unit (the CPU has it, Linux granted it, and
    GRACE_AMX is not 0). Read on every call of the row limits: once the library was tried, only the flag."""
    return _AMX if _TRIED else (available() and _AMX)


_BF16_VIA_FP32: bool | None = None


def bf16_gemm_via_fp32() -> bool:
    """True on a CPU without AVX-512 BF16 (or AMX), where torch's bf16 GEMM has no fast path: on a 2-core AMD Zen 3
    it ran 2048x2048 at 256 rows in 100 ms, the same product in fp32 (both operands converted, products exact, fp32
    sums as before) in 17 ms. The modules' many-row bf16 products then go through fp32."""
    global _BF16_VIA_FP32
    if _BF16_VIA_FP32 is None:
        flags = _cpu_flags()
        _BF16_VIA_FP32 = platform.machine().lower() in ("x86_64", "amd64") and not (
            "avx512_bf16" in flags or "amx_bf16" in flags)
    return _BF16_VIA_FP32


# from this many rows converting both operands to fp32 pays for itself there (the same Zen 3, 2048 x 2048: at 8 rows
# 6.1 ms against 3.5 ms for the bf16 GEMM, at 16 rows 5.2 ms against 6.4)
BF16_VIA_FP32_MIN_ROWS = 9


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for bf16 CPU tensors by the faster of torch's two correct routes (`bf16_gemm_via_fp32`)."""
    if (bf16_gemm_via_fp32() and x.dtype is torch.bfloat16 and x.device.type == "cpu"
            and x.shape[:-1].numel() >= BF16_VIA_FP32_MIN_ROWS):
        y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return y.to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def worth_it(out_features: int, in_features: int) -> bool:
    return out_features * in_features >= MIN_WEIGHTS


def usable(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """The kernels take CPU bf16 activations, no autograd, and run only when the library loaded."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and all(t.device.type == "cpu" for t in tensors)
            and not (torch.is_grad_enabled() and x.requires_grad) and (_LIB is not None if _TRIED else available()))


def _threads() -> int:
    return max(1, torch.get_num_threads())


# -- GEMVs, tile and pair GEMMs: x [..., K] bf16 (M rows) -> y [..., N] fp32, or bf16 (the fp32 result rounded to nearest
# even, as .to() does). The output is allocated in its final shape: a reshape before and after cost ~2.5 us of a
# ~30 us decode-step linear.

def _check_out_dtype(dtype: torch.dtype) -> None:
    if dtype is not torch.bfloat16 and dtype is not torch.float32:
        raise ValueError(f"the GEMVs write float32 or bfloat16, not {dtype}")


def _output(x: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    _check_out_dtype(dtype)
    return torch.empty(*x.shape[:-1], n, dtype=dtype)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x @ weight.T for bf16 weight [N, K], K a multiple of 32."""
    x, weight = x.contiguous(), weight.contiguous()
    k = x.shape[-1]
    y = _output(x, weight.shape[0], dtype)
    library().grace_gemv_bf16(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // k, weight.shape[0], k,
                              _threads(), dtype is torch.bfloat16)
    return y


# Which kernel takes how many rows (crossovers measured on the 2B shapes with cold weights, 2 threads):
# - the GEMVs, up to INT4_GEMV_MAX_ROWS / INT8_GEMV_MAX_ROWS: they unpack the codes once per 4 rows and compute
#   the exact group-wise product. At 16 rows the INT4 GEMV and the pair GEMM are within 2 % on all four shapes,
#   from 20 the pair GEMM leads; for INT8 the tile GEMM leads from 8 rows.
# - the tile GEMM (INT8 only, up to INT8_TILE_MAX_ROWS): each 8-row tile dequantized once into L1 / L2 and met
#   by a 4 x 4 bf16 dot-product kernel; at 8-16 rows it is level with the pair GEMM or up to 25 % ahead (K = 6144).
# - the pair GEMM above (grace_pair_gemm_*, up to the modules' KERNEL_MAX_ROWS): 32 output rows dequantized at a
#   time into the dot product's pair layout and met by a 12 x 32 register-blocked kernel at the bf16 peak; at
#   32-96 rows it leads the tile GEMM by 5-45 % and dequantize + oneDNN by 4-25 %.
# Where the CPU has AMX (`amx()`), the GEMVs' rows go to the AMX GEMVs (grace_amx_gemv_*: x's integer digits against
# the codes on the tile unit; on a 2-core AMX guest INT8 1.7-2x the AVX-512 INT8 GEMV, INT4 1.0-1.2x the AVX-512
# INT4 GEMV at one row and 1.9x at four, cold weights), and oneDNN's bf16
# GEMM runs on it, 1.8-8x ahead of our AVX-512 GEMMs from 16 rows on
# (bench/results/linear_kernels_amx_v18.json), and so do ours: above AMX_INT4_GEMV_MAX_ROWS / AMX_INT8_GEMV_MAX_ROWS
# the AMX GEMM (grace_amx_gemm_*) takes every row count (a 2-core AMX guest, the kernels alone with cold weights in a
# scratch run, not in bench/: at 4 rows the INT8 GEMV 0-11 % behind the AMX GEMM, at 5 the INT4 GEMV 10-27 %).
# Numerics: the GEMVs compute the exact group-wise product in fp32; the tile, pair and AMX GEMMs, like the
# dequantize + GEMM path above them, meet dequantize()'s bf16 weights (fp32 accumulation). Every path gives a row
# the same bits whatever other rows share the call.
INT4_GEMV_MAX_ROWS = 16
INT8_GEMV_MAX_ROWS = 7
INT8_TILE_MAX_ROWS = 16
AMX_INT4_GEMV_MAX_ROWS = 4
AMX_INT8_GEMV_MAX_ROWS = 3
# the AVX2 build (fp32 FMAs, no GEMMs of its own): up to these rows the GEMVs beat dequantize + torch's GEMM
# (a 2-core AMD Zen 3, module forwards, warm weights, a scratch run: on 2048->2048 and 6144->2048 the INT8 GEMV led
# dequantize + the fp32 GEMM at every row count to 64, by 1.5-9x; the INT4 GEMV to 48, level there on 2048->2048 and
# 1.1x behind at 64)
AVX2_INT4_GEMV_MAX_ROWS = 40
AVX2_INT8_GEMV_MAX_ROWS = 64


def gemv_max_rows(kind: str) -> int:
    """Up to how many rows the GEMV of "int4" / "int8" weights runs (read at each call)."""
    if _ISA == "avx2":
        return AVX2_INT4_GEMV_MAX_ROWS if kind == "int4" else AVX2_INT8_GEMV_MAX_ROWS
    if amx():
        return AMX_INT4_GEMV_MAX_ROWS if kind == "int4" else AMX_INT8_GEMV_MAX_ROWS
    return INT4_GEMV_MAX_ROWS if kind == "int4" else INT8_GEMV_MAX_ROWS


def gemm_path(kind: str, rows: int) -> str:
    """The kernel that takes `rows` activation rows of "int4" / "int8" weights: "gemv", "amx_gemv" (on AMX),
    "tile_gemm", "pair_gemm", "amx_gemm" or, on the AVX2 build, "dequantize" (into this thread's bf16 buffer, then
    torch's GEMM)."""
    if rows <= gemv_max_rows(kind):
        return "amx_gemv" if _AMX else "gemv"
    if _ISA == "avx2":
        return "dequantize"
    if _AMX:
        return "amx_gemm"
    return "tile_gemm" if kind == "int8" and rows <= INT8_TILE_MAX_ROWS else "pair_gemm"


def _quantized_linear(kind: str, x: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, group_size: int, n: int,
                      dtype: torch.dtype) -> torch.Tensor:
    x = x.contiguous()
    k = x.shape[-1]
    m = x.numel() // k
    path = gemm_path(kind, m)
    if path == "dequantize":
        dequant = dequant_int8 if kind == "int8" else dequant_int4
        _check_out_dtype(dtype)
        y = dequantized_linear(x, lambda start, rows, out: dequant(codes, params, group_size, n, start, rows, out), n, k)
        return y.to(dtype)
    y = _output(x, n, dtype)
    getattr(library(), f"grace_{path}_{kind}")(x.data_ptr(), codes.data_ptr(), params.data_ptr(),
                                                             y.data_ptr(), m, n, k, group_size, _threads(),
                                                             dtype is torch.bfloat16)
    return y


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, n: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x @ W.T for the tiled int8 layout (quant/int8.py): qweight int8 [N/8, G, 8, gs], scales bf16 [N/8, G, 8],
    W[n, k] = q * s; gs a multiple of 64. The GEMV or a GEMM by the number of rows (`gemm_path`)."""
    return _quantized_linear("int8", x, qweight, scales, group_size, n, dtype)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x @ W.T for the tiled int4 layout (quant/int4.py): packed uint8 [N/8, K/128, 8, 64], scales_and_zeros
    bf16 [N/8, G, 8, 2], W[n, k] = (c - 8) * s + z; group_size a multiple of 128. The GEMV or a GEMM by the number
    of rows (`gemm_path`)."""
    return _quantized_linear("int4", x, packed, scales_and_zeros, group_size, n, dtype)


MANY_MAX = 8          # weights per call (the C side's tile table)


def gemv_many(kind: str, x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None, int]],
              group_size: int = 0) -> list[torch.Tensor]:
    """x @ W.T for several weights at once, bf16 out: kind "int4" / "int8" [(codes, params, N), ...] in the
    tiled layouts (at most INT4_GEMV_MAX_ROWS / INT8_GEMV_MAX_ROWS rows), or "bf16" [(weight, None, N), ...]
    for one row (every N a multiple of 8). The same tiles as one GEMV each, so the same bits, in one call and
    one parallel region: a layer's q / k / v or gate / up projections read x once and pay one call."""
    x = x.contiguous()
    k = x.shape[-1]
    count = len(weights)
    if not 1 <= count <= MANY_MAX or any(n % 8 for _, _, n in weights) or (kind == "bf16" and x.numel() != k):
        raise ValueError(f"gemv_many takes 1-{MANY_MAX} weights of whole 8-row tiles (bf16: one row)")
    outs = [_output(x, n, torch.bfloat16) for _, _, n in weights]
    ptrs = lambda values: (ctypes.c_void_p * count)(*values)   # noqa: E731
    ns = (ctypes.c_int64 * count)(*[n for _, _, n in weights])
    ys = ptrs([y.data_ptr() for y in outs])
    lib = library()
    if kind == "bf16":
        lib.grace_gemv_bf16_many(x.data_ptr(), ptrs([w.data_ptr() for w, _, _ in weights]), ys, ns, count, k,
                                 _threads(), 1)
    else:
        m = x.numel() // k
        fn = getattr(lib, f"grace_{gemm_path(kind, m)}_{kind}_many")
        fn(x.data_ptr(), ptrs([c.data_ptr() for c, _, _ in weights]), ptrs([q.data_ptr() for _, q, _ in weights]),
           ys, ns, count, m, k, group_size, _threads(), 1)
    return outs


# -- dequantize (bit-identical to the modules' dequantize()) and the bf16 GEMM ------------------------------

def _scratch(numel: int) -> torch.Tensor:
    """A bf16 buffer reused by every call from this thread (threads never share one)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _local.buf = torch.empty(numel, dtype=torch.bfloat16)
    return buf[:numel]


# dequantizing this many bytes or more writes around the cache (non-temporal stores; kernels_src.py says why):
# whole-model prefill of 256 rows measured 0.95x bf16 with them and 0.92x without (INT4; INT8 0.96x vs 0.93x)
STREAM_MIN_BYTES = 1 << 22


def _stream(out: torch.Tensor) -> bool:
    return out.numel() * out.element_size() >= STREAM_MIN_BYTES


def dequant_int8(qweight, scales, group_size: int, n: int, start: int, rows: int, out: torch.Tensor) -> torch.Tensor:
    """Rows start .. start+rows-1 of the tiled int8 weight, in bf16, into `out` [rows, K]."""
    k = qweight.shape[1] * group_size
    library().grace_dequant_int8(qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), n, k, group_size, start, rows,
                                 _threads(), _stream(out))
    return out


def dequant_int4(packed, scales_and_zeros, group_size: int, n: int, start: int, rows: int, out: torch.Tensor) -> torch.Tensor:
    """Rows start .. start+rows-1 of the tiled int4 weight, in bf16, into `out` [rows, K]."""
    k = packed.shape[1] * 128
    library().grace_dequant_int4(packed.data_ptr(), scales_and_zeros.data_ptr(), out.data_ptr(), n, k, group_size,
                                 start, rows, _threads(), _stream(out))
    return out


def dequantized_linear(x: torch.Tensor, dequant, out_features: int, in_features: int) -> torch.Tensor:
    """F.linear(x, W) with W dequantized by `dequant(start, rows, out)` into this thread's reused buffer,
    in row chunks of at most SCRATCH_ELEMENTS weights."""
    step = max(8, SCRATCH_ELEMENTS // in_features // 8 * 8)      # whole tiles of 8 rows
    parts = []
    for start in range(0, out_features, step):
        rows = min(step, out_features - start)
        w = dequant(start, rows, _scratch(rows * in_features).view(rows, in_features))
        parts.append(bf16_linear(x, w))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# -- attention of one query token (a decode step) ---------------------------------------------------------

ATTENTION_MAX_HEAD_DIM = 256
ATTENTION_MAX_GROUP = 16


def attention_decode_usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Shapes and dtypes the decode attention kernel takes: query [B, Hq, 1, D], key / value [B, Hkv, L, D],
    bf16 on the CPU, D a multiple of 32 up to 256, at most 16 query heads per key/value head, rows of D
    contiguous elements."""
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape or query.shape[2] != 1:
        return False
    b, hq, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    return (key.shape[0] == b and key.shape[3] == d and d % 32 == 0 and d <= ATTENTION_MAX_HEAD_DIM and length > 0
            and hq % hkv == 0 and hq // hkv <= ATTENTION_MAX_GROUP and key.stride(3) == 1 and value.stride(3) == 1
            and all(t.dtype == torch.bfloat16 for t in (query, key, value))
            and not any(t.requires_grad and torch.is_grad_enabled() for t in (query, key, value))
            and usable(query, key, value))


def attention_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query position, grouped-query heads, no mask (a decode step attends to
    every cached position). query [B, Hq, 1, D] -> [B, 1, Hq, D] bf16 (the layout attention functions return)."""
    b, hq, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    q = query.reshape(b, hq, d).contiguous()
    out = torch.empty(b, 1, hq, d, dtype=torch.bfloat16)
    ks, vs = key.stride(), value.stride()
    library().grace_attention_decode(q.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), b, hq, hkv, length, d,
                                     ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], float(scale), _threads())
    return out


# -- RMSNorm of a few rows -------------------------------------------------------------------------------

RMS_NORM_MAX_ELEMENTS = 1 << 15      # one thread: beyond a decode step's rows torch's two threads are faster


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)).to(bf16) over the last dim, x and weight bf16 on the CPU."""
    xc = x.contiguous()
    out = torch.empty_like(xc)
    h = x.shape[-1]
    library().grace_rms_norm(xc.data_ptr(), weight.data_ptr(), out.data_ptr(), xc.numel() // h, h, float(eps))
    return out


# -- a decode step's queries and keys: per-head RMSNorm and rotary embedding ------------------------------

def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_norm: tuple[torch.Tensor, float] | None,
                 k_norm: tuple[torch.Tensor, float] | None, cos: torch.Tensor, sin: torch.Tensor,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key projections of one position per sequence, q [B, 1, Hq * D] and k [B, 1, Hkv * D], each
    head RMSNorm-ed (q_norm / k_norm = (weight [D], eps), or None: no norm) and rotated by cos / sin [B, 1, D],
    with transformers' roundings. All bf16, contiguous, on the CPU (`qk_norm_rope_usable`). Returns new tensors."""
    b = q.shape[0]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    qw, q_eps = q_norm if q_norm is not None else (None, 0.0)
    kw, k_eps = k_norm if k_norm is not None else (None, 0.0)
    library().grace_qk_norm_rope(q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr(),
                                 qw.data_ptr() if qw is not None else None, kw.data_ptr() if kw is not None else None,
                                 float(q_eps), float(k_eps), cos.data_ptr(), sin.data_ptr(), b,
                                 q.shape[-1] // head_dim, k.shape[-1] // head_dim, head_dim)
    return q_out, k_out


def qk_norm_rope_usable(q: torch.Tensor, k: torch.Tensor, q_norm, k_norm, cos: torch.Tensor, sin: torch.Tensor,
                        head_dim: int) -> bool:
    """What `qk_norm_rope` takes (see there); D even, at most ATTENTION_MAX_HEAD_DIM."""
    b = q.shape[0]
    if not (q.dim() == k.dim() == cos.dim() == 3 and q.shape[1] == 1 and k.shape[:2] == (b, 1)
            and cos.shape == sin.shape == (b, 1, head_dim) and head_dim % 2 == 0 and head_dim <= ATTENTION_MAX_HEAD_DIM
            and q.shape[2] % head_dim == 0 and k.shape[2] % head_dim == 0):
        return False
    tensors = [q, k, cos, sin] + [n[0] for n in (q_norm, k_norm) if n is not None]
    if any(n is not None and n[0].shape != (head_dim,) for n in (q_norm, k_norm)):
        return False
    return (all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)
            and not any(t.requires_grad and torch.is_grad_enabled() for t in tensors) and usable(*tensors))
