"""grace's CPU kernels (grace/quant/kernels.py) against the plain dequantize reference, the row
thresholds between GEMV and dequantize + GEMM, and the clean fallback when they cannot be built."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grace.quant import int4 as q4
from grace.quant import int8 as q8
from grace.quant import kernels

try:
    from .kernel_cases import exact_group_weight, int4_module, int8_module, rel
except ImportError:                      # tests/ collected without packages (rootdir sys.path insertion)
    from kernel_cases import exact_group_weight, int4_module, int8_module, rel

ROOT = Path(__file__).resolve().parents[2]
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="grace's CPU kernels need x86-64 AVX-512 BF16 and cc")
needs_amx = pytest.mark.skipif(not kernels.amx(), reason="the AMX GEMM needs a CPU with AMX (and Linux granting it)")
needs_avx512 = pytest.mark.skipif(kernels.isa() != "avx512", reason="the tile and pair GEMMs are in the AVX-512 build")
# (in, out, group): several 8-row tiles and groups, a group of 256, a single tile
SHAPES = [(256, 64, 128), (384, 72, 128), (512, 40, 256), (256, 8, 128)]



@pytest.fixture(autouse=True)
def kernels_on_small_weights(monkeypatch):
    """The tests use small modules: let the kernels take them (production skips weights < MIN_WEIGHTS)."""
    monkeypatch.setattr(kernels, "MIN_WEIGHTS", 0)

@needs_kernels
@pytest.mark.parametrize("in_f,out_f,group", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
def test_gemvs_match_the_exact_group_wise_product(in_f, out_f, group, rows, monkeypatch):
    """Before the output's bf16 rounding the GEMVs are the group-wise formula in fp32 (error ~1e-6, not ~1e-3)."""
    monkeypatch.setattr(kernels, "_AMX", False)                        # the AVX-512 row limits, patched:
    monkeypatch.setattr(kernels, "INT4_GEMV_MAX_ROWS", 64)             # the GEMVs at every row count here
    monkeypatch.setattr(kernels, "INT8_GEMV_MAX_ROWS", 64)
    x = torch.randn(rows, in_f).to(torch.bfloat16)
    m8, m4 = int8_module(in_f, out_f, group), int4_module(in_f, out_f, group)
    assert (m8.layout, m4.layout) == ("tiled", "tiled")
    y8 = kernels.linear_int8(x, m8.qweight, m8.scales, group, out_f)
    assert y8.dtype == torch.float32 and rel(y8, x.double() @ exact_group_weight(m8).t()) < 1e-6
    y4 = kernels.linear_int4(x, m4.weight_packed, m4.scales_and_zeros, group, out_f)
    assert rel(y4, x.double() @ exact_group_weight(m4).t()) < 2e-5     # 128 + c trick: a little cancellation
    w = torch.randn(out_f, in_f).to(torch.bfloat16)
    assert rel(kernels.linear_bf16(x, w), x.double() @ w.double().t()) < 1e-6


@needs_avx512
@needs_kernels
@pytest.mark.parametrize("in_f,out_f,group", SHAPES + [(256, 48, 128), (256, 56, 128), (2048, 136, 128), (6144, 72, 128),
                                                        (20480, 24, 128)])
@pytest.mark.parametrize("rows", list(range(1, 14)) + [16, 17, 32, 33, 40, 50])
@pytest.mark.parametrize("gemm", ["tile_gemm", "pair_gemm", pytest.param("amx_gemm", marks=needs_amx)])
def test_many_row_gemms_meet_the_dequantized_bf16_weights(in_f, out_f, group, rows, gemm, monkeypatch):
    """The tile, pair and AMX GEMMs dequantize each weight as dequantize() does and accumulate in fp32: before
    the output's rounding they are x @ dequantize().T to ~1e-7 (the GEMVs' exact group-wise product differs by
    ~1e-3). The shapes give the pair and AMX GEMMs partial 32-row blocks of 8, 16 and 24 rows (40 / 72, 48, 56
    outputs), the AMX GEMM's weight blocks of 128, 64 and 32 rows (K = 2048, 6144, 20480) a partial one, and the
    rows every row-block size 1-12 and the AMX GEMM's half and whole 32-row blocks (13-50 rows: full blocks and a
    rest). INT4 has no tile GEMM (the pair GEMM)."""
    monkeypatch.setattr(kernels, "_AMX", gemm == "amx_gemm")
    for name in ("INT4_GEMV_MAX_ROWS", "INT8_GEMV_MAX_ROWS", "AMX_INT4_GEMV_MAX_ROWS", "AMX_INT8_GEMV_MAX_ROWS"):
        monkeypatch.setattr(kernels, name, 0)
    monkeypatch.setattr(kernels, "INT8_TILE_MAX_ROWS", 64 if gemm == "tile_gemm" else 0)
    assert kernels.gemm_path("int8", rows) == gemm
    x = torch.randn(rows, in_f).to(torch.bfloat16)
    m8, m4 = int8_module(in_f, out_f, group), int4_module(in_f, out_f, group)
    y8 = kernels.linear_int8(x, m8.qweight, m8.scales, group, out_f)
    y4 = kernels.linear_int4(x, m4.weight_packed, m4.scales_and_zeros, group, out_f)
    tol = 1e-6 * max(1.0, (in_f / 2048) ** 0.5)                           # fp32 sums of in_f products, in order
    assert rel(y8, x.double() @ m8.dequantize().double().t()) < tol
    assert rel(y4, x.double() @ m4.dequantize().double().t()) < tol
    assert rel(y4, x.double() @ exact_group_weight(m4).t()) > 1e-5          # really the bf16 weights, not the exact ones
    for y, run in ((y4, lambda: kernels.linear_int4(x, m4.weight_packed, m4.scales_and_zeros, group, out_f, torch.bfloat16)),
                   (y8, lambda: kernels.linear_int8(x, m8.qweight, m8.scales, group, out_f, torch.bfloat16))):
        assert torch.equal(run(), y.to(torch.bfloat16))
    # within one kernel a row's bits do not depend on its neighbours
    assert torch.equal(kernels.linear_int4(x[-1:], m4.weight_packed, m4.scales_and_zeros, group, out_f), y4[-1:])
    assert torch.equal(kernels.linear_int8(x[-1:], m8.qweight, m8.scales, group, out_f), y8[-1:])


@needs_avx512
@needs_kernels
def test_the_row_thresholds_pick_the_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_AMX", False)                  # the AVX-512 kernels (the AMX ones: below)
    lib = kernels.library()
    calls = []
    names = ["grace_gemv_int4", "grace_pair_gemm_int4", "grace_gemv_int8", "grace_tile_gemm_int8", "grace_pair_gemm_int8"]
    for name in names:
        real = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    m8, m4 = int8_module(256, 64, 128), int4_module(256, 64, 128)
    for rows in (kernels.INT4_GEMV_MAX_ROWS, kernels.INT4_GEMV_MAX_ROWS + 1):
        kernels.linear_int4(torch.randn(rows, 256).to(torch.bfloat16), m4.weight_packed, m4.scales_and_zeros, 128, 64)
    for rows in (kernels.INT8_GEMV_MAX_ROWS, kernels.INT8_GEMV_MAX_ROWS + 1, kernels.INT8_TILE_MAX_ROWS,
                 kernels.INT8_TILE_MAX_ROWS + 1):
        kernels.linear_int8(torch.randn(rows, 256).to(torch.bfloat16), m8.qweight, m8.scales, 128, 64)
    assert calls == ["grace_gemv_int4", "grace_pair_gemm_int4", "grace_gemv_int8", "grace_tile_gemm_int8",
                     "grace_tile_gemm_int8", "grace_pair_gemm_int8"]


@needs_amx
def test_on_amx_the_amx_gemm_takes_every_row_count_above_the_gemvs(monkeypatch):
    lib = kernels.library()
    calls = []
    for name in ["grace_amx_gemv_int4", "grace_amx_gemm_int4", "grace_amx_gemv_int8", "grace_amx_gemm_int8"]:
        real = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    m8, m4 = int8_module(256, 64, 128), int4_module(256, 64, 128)
    limit4, limit8 = kernels.gemv_max_rows("int4"), kernels.gemv_max_rows("int8")
    assert (limit4, limit8) == (kernels.AMX_INT4_GEMV_MAX_ROWS, kernels.AMX_INT8_GEMV_MAX_ROWS)
    for rows in (limit4, limit4 + 1, 300):
        kernels.linear_int4(torch.randn(rows, 256).to(torch.bfloat16), m4.weight_packed, m4.scales_and_zeros, 128, 64)
    for rows in (limit8, limit8 + 1, 16, 300):
        kernels.linear_int8(torch.randn(rows, 256).to(torch.bfloat16), m8.qweight, m8.scales, 128, 64)
    assert calls == (["grace_amx_gemv_int4"] + ["grace_amx_gemm_int4"] * 2 + ["grace_amx_gemv_int8"]
                     + ["grace_amx_gemm_int8"] * 3)


def _amx_gemv_int8(x, module, dtype=torch.float32, threads=2):
    n, k = module.out_features, module.in_features
    y = torch.empty(x.shape[0], n, dtype=dtype)
    kernels.library().grace_amx_gemv_int8(x.data_ptr(), module.qweight.data_ptr(), module.scales.data_ptr(),
                                          y.data_ptr(), x.shape[0], n, k, module.group_size, threads,
                                          dtype is torch.bfloat16)
    return y


@needs_amx
@pytest.mark.parametrize("in_f,out_f,group", SHAPES + [(256, 64, 64), (384, 16, 192), (1024, 16, 512), (2048, 136, 128),
                                                    (512, 520, 128), (512, 520, 64)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_the_amx_int8_gemv_is_the_exact_group_wise_product(in_f, out_f, group, rows):
    """Integer digits of x against the codes: exact sums, one fp32 rounding per group, so closer to the exact
    product than the fp32 GEMV (rel ~5e-8), at any magnitude of x, denormals and a 1e6x outlier included."""
    m8 = int8_module(in_f, out_f, group, seed=rows)
    want = lambda x: x.double() @ exact_group_weight(m8).t()   # noqa: E731
    for scale in (1e-38, 1e-20, 1.0, 1e4, 1e25):
        for outlier in (False, True):                            # an outlier: the other x keep their bits
            x = (torch.randn(rows, in_f) * scale).to(torch.bfloat16)
            if outlier:
                x[-1, 3] = 1e6 * scale
            assert rel(_amx_gemv_int8(x, m8), want(x)) < 2e-7, (scale, outlier)
    y = _amx_gemv_int8(x, m8, torch.bfloat16)
    assert torch.equal(y, _amx_gemv_int8(x, m8).to(torch.bfloat16))


@needs_amx
@pytest.mark.parametrize("group", [64, 128, 256])
def test_the_amx_int8_gemv_gives_the_same_bits_at_any_thread_count(group):
    """The thread count sets how many tiles share one pass (their digit tiles loaded once: 8, 4 or 1 of the
    65 tiles here, a last pass shorter); a tile's sums are the same whichever tiles it shares a pass with."""
    torch.manual_seed(group)
    m8 = int8_module(512, 520, group)
    x = torch.randn(3, 512).to(torch.bfloat16)
    for rows in (1, 3):
        alone = _amx_gemv_int8(x[:rows], m8, threads=1)
        assert rel(alone, x[:rows].double() @ exact_group_weight(m8).t()) < 2e-7
        for threads in (2, 5, 8, 40):
            assert torch.equal(_amx_gemv_int8(x[:rows], m8, threads=threads), alone), threads


@needs_amx
def test_the_amx_int8_gemv_rows_are_independent_and_non_finite_x_stays_non_finite():
    torch.manual_seed(3)
    m8 = int8_module(512, 64, 128)
    x = torch.randn(4, 512).to(torch.bfloat16)
    x[1] *= 1e-3                                                 # rows of different scales share a call
    one_by_one = torch.cat([_amx_gemv_int8(x[i:i + 1], m8) for i in range(4)])
    for m in range(2, 5):
        assert torch.equal(_amx_gemv_int8(x[:m], m8), one_by_one[:m])
    assert torch.equal(_amx_gemv_int8(torch.zeros(1, 512, dtype=torch.bfloat16), m8), torch.zeros(1, 64))
    x[0, 7] = float("inf")
    x[2, 9] = float("nan")                                       # the AVX-512 GEMV takes such a call
    y = _amx_gemv_int8(x, m8)
    assert not y[0].isfinite().any() and y[2].isnan().all()
    assert rel(y[1], x[1:2].double() @ exact_group_weight(m8).t()) < 1e-6


def _amx_gemv_int4(x, module, dtype=torch.float32, threads=2):
    n, k = module.out_features, module.in_features
    y = torch.empty(x.shape[0], n, dtype=dtype)
    kernels.library().grace_amx_gemv_int4(x.data_ptr(), module.weight_packed.data_ptr(),
                                          module.scales_and_zeros.data_ptr(), y.data_ptr(), x.shape[0], n, k,
                                          module.group_size, threads, dtype is torch.bfloat16)
    return y


def _int4_exact(x, module):
    return x.double() @ exact_group_weight(module).t()


@needs_amx
@pytest.mark.parametrize("in_f,out_f,group", SHAPES + [(128, 8, 128), (256, 24, 128), (512, 16, 256), (1024, 40, 512), (2048, 136, 128),
                            (512, 520, 128), (640, 1032, 128)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_the_amx_int4_gemv_is_the_exact_group_wise_product(in_f, out_f, group, rows):
    """Integer digits of x against the unpacked codes, the zeros' term from x's exact integer sums: closer to the
    exact product than the AVX-512 INT4 GEMV (rel ~1e-7 against its 3e-6, up to 1e-3 with denormal x), at any magnitude of x, denormals and
    a 1e6x outlier included; an odd tile count leaves a last tile without a partner."""
    m4 = int4_module(in_f, out_f, group, seed=rows)
    for scale in (1e-38, 1e-20, 1.0, 1e4, 1e25):
        for outlier in (False, True):                            # with one, it would dominate rel's norm alone
            x = (torch.randn(rows, in_f) * scale).to(torch.bfloat16)
            if outlier:
                x[-1, 3] = 1e6 * scale
            assert rel(_amx_gemv_int4(x, m4), _int4_exact(x, m4)) < 5e-7, (scale, outlier)
    y = _amx_gemv_int4(x, m4, torch.bfloat16)
    assert torch.equal(y, _amx_gemv_int4(x, m4).to(torch.bfloat16))


@needs_amx
@pytest.mark.parametrize("group", [128, 256])
def test_the_amx_int4_gemv_gives_the_same_bits_at_any_thread_count(group):
    """The thread count sets how many pairs of tiles share one pass (8, 5, 3, 2 or 1 of the 65 tiles' 33 pairs
    here, the last pair a single tile); a pair's sums are the same whichever pairs it shares a pass with."""
    torch.manual_seed(group)
    m4 = int4_module(512, 520, group)
    x = torch.randn(3, 512).to(torch.bfloat16)
    for rows in (1, 3):
        alone = _amx_gemv_int4(x[:rows], m4, threads=1)
        assert rel(alone, _int4_exact(x[:rows], m4)) < 5e-7
        for threads in (2, 3, 5, 8, 40):
            assert torch.equal(_amx_gemv_int4(x[:rows], m4, threads=threads), alone), threads


@needs_amx
def test_the_amx_int4_gemv_rows_are_independent_and_non_finite_x_stays_non_finite():
    torch.manual_seed(4)
    m4 = int4_module(512, 64, 128)
    x = torch.randn(4, 512).to(torch.bfloat16)
    x[1] *= 1e-3
    one_by_one = torch.cat([_amx_gemv_int4(x[i:i + 1], m4) for i in range(4)])
    for m in range(2, 5):
        assert torch.equal(_amx_gemv_int4(x[:m], m4), one_by_one[:m])
    zero = torch.zeros(1, 512, dtype=torch.bfloat16)
    assert torch.equal(_amx_gemv_int4(zero, m4), torch.zeros(1, 64))
    x[0, 7] = float("inf")
    x[2, 9] = float("nan")                                       # the AVX-512 GEMV takes such a call
    y = _amx_gemv_int4(x, m4)
    assert not y[0].isfinite().any() and y[2].isnan().all()
    assert rel(y[1], _int4_exact(x[1:2], m4)) < 2e-5


@needs_amx
def test_the_amx_int4_gemv_many_matches_one_call_per_weight():
    """q / k / v in one call (the decode step's project_many): the same bits as three GEMVs."""
    torch.manual_seed(5)
    mods = [int4_module(512, n, 128, seed=n) for n in (64, 24, 24)]
    for rows in (1, 4):
        x = torch.randn(rows, 512).to(torch.bfloat16)
        outs = kernels.gemv_many("int4", x, [(m.weight_packed, m.scales_and_zeros, m.out_features) for m in mods], 128)
        for out, m in zip(outs, mods):
            assert torch.equal(out, _amx_gemv_int4(x, m, torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("in_f,out_f,group", SHAPES)
def test_dequantize_kernels_are_bit_identical_to_dequantize(in_f, out_f, group):
    m8, m4 = int8_module(in_f, out_f, group), int4_module(in_f, out_f, group)
    for module, dequant, packed, scales in ((m8, kernels.dequant_int8, m8.qweight, m8.scales),
                                            (m4, kernels.dequant_int4, m4.weight_packed, m4.scales_and_zeros)):
        reference = module.dequantize()
        whole = dequant(packed, scales, group, out_f, 0, out_f, torch.empty(out_f, in_f, dtype=torch.bfloat16))
        assert torch.equal(whole, reference)
        start = out_f // 3 // 8 * 8                          # a range of whole tiles, as the chunked GEMM asks for
        rows = out_f - start
        part = dequant(packed, scales, group, out_f, start, rows, torch.empty(rows, in_f, dtype=torch.bfloat16))
        assert torch.equal(part, reference[start:])


@needs_avx512
@needs_kernels
@pytest.mark.parametrize("make,limit_name", [(int4_module, "q4"), (int8_module, "q8")])
@pytest.mark.parametrize("in_f,out_f,group", SHAPES[:2])
def test_forward_paths_at_the_threshold(make, limit_name, in_f, out_f, group, monkeypatch):
    """KERNEL_MAX_ROWS rows take grace's kernel (there the pair GEMM); one more takes dequantize + the bf16
    GEMM, which is exactly F.linear on dequantize() (same weight, same call)."""
    mod = q4 if limit_name == "q4" else q8
    module = make(in_f, out_f, group)
    limit = mod.KERNEL_MAX_ROWS
    calls = []
    gemv = kernels.linear_int4 if mod is q4 else kernels.linear_int8
    monkeypatch.setattr(kernels, gemv.__name__, lambda *a: calls.append("kernel") or gemv(*a))
    dequantized = kernels.dequantized_linear
    monkeypatch.setattr(kernels, "dequantized_linear", lambda *a: calls.append("dequant") or dequantized(*a))
    with torch.inference_mode():
        x = torch.randn(limit, in_f).to(torch.bfloat16)
        y = module(x)
        assert calls == ["kernel"]
        ref = x.double() @ exact_group_weight(module).t() + module.bias.double()
        assert rel(y, ref) < 4e-3                                      # bf16 output rounding
        x = torch.randn(limit + 1, in_f).to(torch.bfloat16)
        y = module(x)
        assert calls == ["kernel", "dequant"]
        assert torch.equal(y, F.linear(x, module.dequantize()) + module.bias)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_bf16_outputs_are_the_fp32_results_rounded(rows):
    """The GEMVs' bf16 output is bit for bit the fp32 output rounded as .to(bfloat16) rounds it."""
    in_f, out_f, group = 256, 72, 128
    x = torch.randn(rows, in_f).to(torch.bfloat16)
    m8, m4 = int8_module(in_f, out_f, group), int4_module(in_f, out_f, group)
    w = (torch.randn(out_f, in_f) * 50).to(torch.bfloat16)
    for call in (lambda dt: kernels.linear_int8(x, m8.qweight, m8.scales, group, out_f, dt),
                 lambda dt: kernels.linear_int4(x, m4.weight_packed, m4.scales_and_zeros, group, out_f, dt),
                 lambda dt: kernels.linear_bf16(x, w, dt)):
        assert torch.equal(call(torch.bfloat16), call(torch.float32).to(torch.bfloat16))
    with pytest.raises(ValueError):
        kernels.linear_bf16(x, w, torch.float16)


@needs_kernels
@pytest.mark.parametrize("kind", ["int4", "int8", "bf16"])
def test_the_decode_fast_path_gives_the_general_paths_bits(kind):
    """Without a bias a decode step goes straight to the kernel with a bf16 output; with one the general path
    adds it in fp32 and rounds once. Either way: the fp32 kernel result, rounded as .to() rounds."""
    from grace.quant.bf16 import FastBF16Linear

    in_f, out_f, group = 256, 64, 128
    x = torch.randn(2, 1, in_f).to(torch.bfloat16)
    if kind == "bf16":
        with_bias = FastBF16Linear(in_f, out_f, dtype=torch.bfloat16)
        without = FastBF16Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        without.weight = with_bias.weight
        fp32 = kernels.linear_bf16(x.reshape(-1, in_f), with_bias.weight)
    else:
        make, gemv = (int4_module, kernels.linear_int4) if kind == "int4" else (int8_module, kernels.linear_int8)
        with_bias, without = make(in_f, out_f, group), make(in_f, out_f, group, bias=False)   # the same codes
        tensors = ((without.weight_packed, without.scales_and_zeros) if kind == "int4" else (without.qweight, without.scales))
        fp32 = gemv(x.reshape(-1, in_f), *tensors, group, out_f)
    with torch.inference_mode():
        got, biased = without(x), with_bias(x)
    assert got.shape == biased.shape == (2, 1, out_f) and got.dtype == biased.dtype == torch.bfloat16
    assert torch.equal(got.reshape(-1, out_f), fp32.to(torch.bfloat16))
    assert torch.equal(biased.reshape(-1, out_f), (fp32 + with_bias.bias.float()).to(torch.bfloat16))


@needs_kernels
def test_chunked_dequantized_gemm(monkeypatch):
    """Weights larger than the scratch buffer (an lm_head) go through it in row chunks."""
    module = int8_module(256, 72, 128)
    monkeypatch.setattr(kernels, "SCRATCH_ELEMENTS", 256 * 16)        # 16 rows per chunk: 5 chunks
    x = torch.randn(12, 256).to(torch.bfloat16)
    with torch.inference_mode():
        y = kernels.dequantized_linear(x, lambda s, n, out: kernels.dequant_int8(module.qweight, module.scales, 128, 72,
                                                                                 s, n, out), 72, 256)
    assert torch.allclose(y.float(), F.linear(x, module.dequantize()).float(), rtol=1e-2, atol=1e-2)


def test_modules_fall_back_to_torch_kernels(monkeypatch):
    """Without grace's kernels every module still computes its reference: built without them, Int4Linear holds
    torch's CPU layout and Int8Linear the group-major one (torch's per-group loop); a shape the tiles do not
    cover (out % 8 != 0) takes those paths even with the kernels."""
    built_with, untiled4, untiled8 = int4_module(256, 64, 128), int4_module(256, 70, 128), int8_module(256, 70, 128)
    with_kernels = "tiled" if kernels.available() else "cpu"        # a CPU the kernels do not build for: torch's
    assert (built_with.layout, untiled4.layout, untiled8.layout) == (with_kernels, "plain", "groups")
    x = torch.randn(3, 256).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "available", lambda: False)
    built_without, m8 = int4_module(256, 64, 128), int8_module(256, 64, 128)
    assert (built_without.layout, m8.layout) == ("cpu", "groups")
    with torch.inference_mode():
        for module in (built_with, untiled4, untiled8, built_without, m8):
            ref = x.double() @ exact_group_weight(module).t() + module.bias.double()
            assert rel(module(x), ref) < 6e-3


def test_fallback_when_the_compiler_fails(tmp_path):
    """A broken compiler (or GRACE_CPU_KERNELS=0) leaves available() False, with no exception."""
    code = ("from grace.quant import kernels, Int4Linear; import torch; assert not kernels.available(); "
            "m = Int4Linear(128, 16, False, 128); print(m.layout, m(torch.randn(1, 128, dtype=torch.bfloat16)).shape)")
    for env in ({"CC": "/bin/false"}, {"GRACE_CPU_KERNELS": "0"}):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "GRACE_KERNEL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), **env})
        assert run.returncode == 0, run.stderr
        assert "torch.Size([1, 16])" in run.stdout


@needs_avx512
@needs_kernels
def test_without_amx_everything_else_still_builds_and_runs(tmp_path):
    """A compiler that cannot build the AMX GEMM (here: one that fails unless told GRACE_NO_AMX) still gives the
    other kernels, cached under their own name and reused (said at every load) until that file is deleted, when
    the full build runs again; GRACE_AMX=0 turns the AMX path off. Without it the many-row GEMM is the pair GEMM."""
    cc = tmp_path / "cc-without-amx"
    cc.write_text('#!/bin/sh\ncase "$*" in *GRACE_NO_AMX*) exec cc "$@";; esac\n'
                  '[ -n "$CC_WORKS" ] && exec cc "$@"\nexit 1\n')                 # (its path is in the cache key)
    cc.chmod(0o755)
    cache = tmp_path / "cache"
    code = ("import logging; logging.basicConfig(level=logging.INFO); from grace.quant import kernels; "
            "assert kernels.available(); "
            "print(kernels.amx(), kernels.gemm_path('int4', 100), kernels.library().grace_amx_ready())")

    def run(**env):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "GRACE_KERNEL_CACHE": str(cache), "PYTHONPATH": str(ROOT), **env})
        assert done.returncode == 0, done.stderr
        return done.stdout.split(), done.stderr

    granted = "1" if kernels.amx() else None
    assert run(CC=str(cc))[0] == ["False", "pair_gemm", "0"]
    assert [p.name.endswith("_no_amx.so") for p in cache.iterdir()] == [True]
    out, err = run(CC=str(cc), CC_WORKS="1")                         # the compiler works now: the fallback stays...
    assert out == ["False", "pair_gemm", "0"] and "delete" in err
    next(cache.iterdir()).unlink()                                   # ... until it is deleted
    out, _ = run(CC=str(cc), CC_WORKS="1")
    assert out[0] == str(kernels.amx()) and sorted(p.name.endswith("_no_amx.so") for p in cache.iterdir()) == [False]
    out, _ = run(GRACE_AMX="0")
    assert out[:2] == ["False", "pair_gemm"]
    if granted:
        assert out[2] == granted                                     # the CPU could: the switch alone turned it off


@needs_avx512
@needs_kernels
@pytest.mark.parametrize("gemm", ["pair_gemm", pytest.param("amx_gemm", marks=needs_amx)])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_many_row_gemms_write_only_their_outputs(gemm, kind, monkeypatch):
    """Called directly on an output with guard words around it: every output written, nothing outside."""
    monkeypatch.setattr(kernels, "_AMX", gemm == "amx_gemm")
    in_f, out_f, group, rows = 384, 40, 128, 19
    module = (int8_module if kind == "int8" else int4_module)(in_f, out_f, group)
    codes, params = (module.qweight, module.scales) if kind == "int8" else (module.weight_packed, module.scales_and_zeros)
    x = torch.randn(rows, in_f).to(torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.full((rows * out_f + 64,), 12345.0).to(dtype)
        y = buf[32:32 + rows * out_f]
        getattr(kernels.library(), f"grace_{gemm}_{kind}")(x.data_ptr(), codes.data_ptr(), params.data_ptr(),
                                                            y.data_ptr(), rows, out_f, in_f, group, 2, dtype is torch.bfloat16)
        assert torch.all(buf[:32] == 12345.0) and torch.all(buf[-32:] == 12345.0)
        want = x.double() @ module.dequantize().double().t()
        assert rel(y.view(rows, out_f), want) < (1e-6 if dtype is torch.float32 else 4e-3)


@needs_kernels
def test_bf16_gemv_rows_do_not_depend_on_the_row_count():
    """The 4x4-block reduction sums in the same order as the one-row path: batched rows get single-row bits."""
    torch.manual_seed(0)
    w = (torch.randn(1024, 2048) * 0.02).to(torch.bfloat16)
    x = torch.randn(16, 2048).to(torch.bfloat16)
    one_by_one = torch.cat([kernels.linear_bf16(x[i:i + 1], w) for i in range(16)])
    for m in (2, 4, 5, 8, 16):
        assert torch.equal(kernels.linear_bf16(x[:m], w), one_by_one[:m])


@needs_kernels
@pytest.mark.parametrize("group", [128, 256])
def test_quantized_gemv_rows_do_not_depend_on_the_row_count(group):
    """Every activation row of a GEMV pass (up to 4 rows) does the same fp32 operations in the
    same order: a row's output is the same bits alone or beside others, at every row count the GEMVs take."""
    torch.manual_seed(1)
    m8, m4 = int8_module(512, 64, group), int4_module(512, 64, group)
    runs = {"int4": lambda v: kernels.linear_int4(v, m4.weight_packed, m4.scales_and_zeros, group, 64),
            "int8": lambda v: kernels.linear_int8(v, m8.qweight, m8.scales, group, 64)}
    for kind, run in runs.items():
        x = torch.randn(kernels.gemv_max_rows(kind), 512).to(torch.bfloat16)
        one_by_one = torch.cat([run(x[i:i + 1]) for i in range(x.shape[0])])
        for m in range(2, x.shape[0] + 1):
            assert torch.equal(run(x[:m]), one_by_one[:m]), (kind, m)


@needs_avx512
@needs_kernels
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gemm", ["pair_gemm", pytest.param("amx_gemm", marks=needs_amx)])
def test_a_quantized_model_prefills_on_the_many_row_gemm_like_its_dequantized_twin(bits, gemm, monkeypatch):
    """A 40-token prefill of a (small, kernel-shaped) quantized Llama runs every decoder linear through the pair
    GEMM (or, on AMX, the AMX GEMM), and its logits are those of the same model with each linear replaced by
    nn.Linear(dequantize()) (torch's bf16 GEMM on the same bf16 weights) up to bf16 rounding of the activations."""
    monkeypatch.setattr(kernels, "_AMX", gemm == "amx_gemm")
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    import grace
    from grace.quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from grace.quant.qlinear import QuantizedLinear
    from grace.quant.quantize import replace_module

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    grace.quantize_(model, Int4WeightOnlyConfig(symmetric=False) if bits == 4 else Int8WeightOnlyConfig())
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 14 and all(m.layout == "tiled" for m in quantized.values())
    twin = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    twin.load_state_dict(model.state_dict(), strict=False)                 # embeddings, norms, lm_head
    for name, m in quantized.items():
        linear = nn.Linear(m.in_features, m.out_features, bias=False, dtype=torch.bfloat16)
        linear.weight.data.copy_(m.dequantize())
        replace_module(twin, name, linear)
    lib, kind, calls = kernels.library(), f"int{bits}", []
    assert kernels.gemm_path(kind, 40) == gemm
    real = getattr(lib, f"grace_{gemm}_{kind}")
    monkeypatch.setattr(lib, f"grace_{gemm}_{kind}", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(1, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got, want = model(ids).logits.float(), twin(ids).logits.float()
    assert len(calls) == 14
    # measured: cosine 1.000000 and the largest difference < 1e-4 of the largest logit where the twin's GEMM (oneDNN)
    # runs on AVX-512 (AMD), one bf16 step of it (2^-8 - 2^-7) where it runs on AMX (Intel), whose sums round
    # differently; a 1 % noise on the twin's weights gives 0.99975 and 2.5 %
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99995
    onednn_on_amx = kernels._AMX_FLAGS <= kernels._cpu_flags()
    assert (got - want).abs().max() < (2 ** -7 if onednn_on_amx else 0.003) * want.abs().max()
