"""The AVX2 build of grace's CPU kernels (CPUs without AVX-512 BF16): its row limits, its many-row path (dequantize,
then the product in fp32 where torch's bf16 GEMM is slow), and, on an AVX-512 CPU, the AVX2 build itself under the
kernel tests (GRACE_CPU_ISA=avx2), so that both builds are tested wherever CI runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grace.quant import kernels

try:
    from .kernel_cases import exact_group_weight, int4_module, int8_module, rel
except ImportError:
    from kernel_cases import exact_group_weight, int4_module, int8_module, rel

ROOT = Path(__file__).resolve().parents[2]
on_avx2 = pytest.mark.skipif(kernels.isa() != "avx2", reason="this machine runs the AVX-512 build (or none)")


@pytest.fixture(autouse=True)
def kernels_on_small_weights(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_WEIGHTS", 0)


def test_the_build_is_the_one_asked_for():
    if os.environ.get("GRACE_CPU_ISA") == "avx2":
        assert kernels.isa() == "avx2" and not kernels.amx()
    elif kernels.available():
        assert kernels.isa() in ("avx2", "avx512")


@on_avx2
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_above_the_gemv_rows_the_avx2_build_dequantizes(kind):
    limit = kernels.gemv_max_rows(kind)
    assert limit == (kernels.AVX2_INT8_GEMV_MAX_ROWS if kind == "int8" else kernels.AVX2_INT4_GEMV_MAX_ROWS)
    assert (kernels.gemm_path(kind, limit), kernels.gemm_path(kind, limit + 1)) == ("gemv", "dequantize")
    module = (int8_module if kind == "int8" else int4_module)(256, 64, 128)
    codes = module.qweight if kind == "int8" else module.weight_packed
    params = module.scales if kind == "int8" else module.scales_and_zeros
    linear = kernels.linear_int8 if kind == "int8" else kernels.linear_int4
    for rows in (limit, limit + 1, 300):
        x = torch.randn(rows, 256).to(torch.bfloat16)
        with torch.inference_mode():
            y = linear(x, codes, params, 128, 64, torch.bfloat16)
        assert y.shape == (rows, 64) and y.dtype == torch.bfloat16
        assert rel(y, x.double() @ exact_group_weight(module).t()) < 4e-3          # bf16 output rounding
        if rows > limit:                  # the same dequantized weights, the product in fp32 and rounded once
            w = module.dequantize()
            assert torch.equal(y, F.linear(x.float(), w.float()).to(torch.bfloat16))


def test_bf16_linear_takes_fp32_where_the_bf16_gemm_is_slow(monkeypatch):
    x, w, b = (torch.randn(40, 256).to(torch.bfloat16), torch.randn(24, 256).to(torch.bfloat16),
               torch.randn(24).to(torch.bfloat16))
    monkeypatch.setattr(kernels, "_BF16_VIA_FP32", True)
    y = kernels.bf16_linear(x, w, b)
    assert torch.equal(y, F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16))
    assert torch.allclose(y.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(kernels.bf16_linear(x[:8], w, b), F.linear(x[:8], w, b))   # a few rows: torch's own path
    monkeypatch.setattr(kernels, "_BF16_VIA_FP32", False)
    assert torch.equal(kernels.bf16_linear(x, w, b), F.linear(x, w, b))


def _avx2_capable() -> bool:
    return {"avx2", "fma"} <= kernels._cpu_flags() and bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.mark.skipif(kernels.isa() == "avx2" or os.environ.get("GRACE_CPU_ISA") == "avx2",
                    reason="the AVX2 build is this machine's own: every kernel test runs on it")
@pytest.mark.skipif(not _avx2_capable(), reason="needs an x86-64 CPU with AVX2 and FMA, and cc")
def test_the_avx2_build_passes_the_kernel_tests(tmp_path):
    """The GEMVs against the exact group-wise product, the dequantizers bit for bit, row independence, bf16 outputs,
    the decode fast path, decode attention, RMSNorm and rotary kernels and whole-model decode, on the AVX2 build."""
    tests = ["tests/quant/test_kernels.py", "tests/quant/test_kernels_avx2.py", "tests/test_cpu_decode.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests], cwd=ROOT,
                         capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "GRACE_CPU_ISA": "avx2", "GRACE_KERNEL_CACHE": str(tmp_path / "cache")})
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout, tail
