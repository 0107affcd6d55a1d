"""Int4Linear / Int8Linear kernels against their plain dequantize reference."""

import pytest
import torch

from grace.quant import Int4Linear, Int4WeightOnlyConfig, Int8Linear, Int8WeightOnlyConfig, quantize_
from grace.quant.int4 import FP32_KERNEL_MAX_ROWS

SHAPES = [(128, 64, 128), (256, 256, 64), (384, 48, 128), (128, 40, 32)]   # (in, out, group); out=40: no CPU kernel


def make_int4(in_f, out_f, group, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = torch.rand(out_f, in_f // group, generator=g) * 0.05 + 0.01
    zeros = torch.randint(0, 16, (out_f, in_f // group), generator=g)
    module = Int4Linear(in_f, out_f, True, group, dtype, device).set_codes(codes, scales, zeros)
    module.bias.data.normal_(generator=g)
    weight = (codes.float() - zeros.float().repeat_interleave(group, 1)) * scales.repeat_interleave(group, 1)
    return module, weight


@pytest.mark.parametrize("in_f,out_f,group", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_int4_kernel_matches_reference_fp32(in_f, out_f, group, rows):
    module, weight = make_int4(in_f, out_f, group, torch.float32)
    assert module.layout == ("cpu" if out_f % 16 == 0 else "plain")
    x = torch.randn(2, rows, in_f)
    expected = x @ weight.t() + module.bias
    assert torch.allclose(module(x), expected, atol=1e-4, rtol=1e-4)
    assert torch.allclose(module.dequantize(), weight, atol=1e-6)


@pytest.mark.parametrize("in_f,out_f,group", SHAPES)
def test_int4_kernel_bf16(in_f, out_f, group):
    module, weight = make_int4(in_f, out_f, group, torch.bfloat16)
    x = torch.randn(5, in_f, dtype=torch.bfloat16)
    ref = x.float() @ module.dequantize().float().t() + module.bias.float()
    assert torch.allclose(module(x).float(), ref, atol=0.05 * ref.abs().max().item() / 10 + 0.02, rtol=0.02)


def test_int4_fp32_decode_uses_kernel_and_prefill_matches():
    module, weight = make_int4(256, 64, 128, torch.float32)
    x = torch.randn(FP32_KERNEL_MAX_ROWS + 5, 256)
    full = module(x)
    rows = torch.cat([module(x[i:i + 1]) for i in range(x.shape[0])])
    assert torch.allclose(full, rows, atol=1e-4)


@pytest.mark.parametrize("in_f,out_f,group", SHAPES)
def test_int4_codes_roundtrip(in_f, out_f, group):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    ones = torch.ones(out_f, in_f // group)
    module = Int4Linear(in_f, out_f, False, group, torch.float32).set_codes(codes, ones, ones * 8)
    assert torch.equal(module.codes(), codes)


def test_int4_dtype_cast_keeps_codes_and_kernel():
    module, weight = make_int4(256, 64, 128, torch.float32)
    before = module.codes().clone()
    module.to(torch.bfloat16)
    assert module.layout == "cpu" and module.scales_and_zeros.dtype == torch.bfloat16
    assert torch.equal(module.codes(), before)
    x = torch.randn(2, 256)
    assert torch.allclose(module(x.bfloat16()).float(), x @ weight.t() + module.bias.float(), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("in_f,out_f,group", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matches_reference(in_f, out_f, group, rows, dtype):
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-128, 128, (out_f, in_f), generator=g)
    scales = torch.rand(out_f, in_f // group, generator=g) * 0.01
    module = Int8Linear(in_f, out_f, False, group, dtype).set_codes(codes, scales)
    weight = codes.float() * scales.repeat_interleave(group, 1)
    x = torch.randn(rows, in_f, dtype=dtype)
    ref = x.float() @ module.dequantize().float().t()
    tol = 1e-4 if dtype == torch.float32 else 0.02 * ref.abs().max().item()
    assert torch.allclose(module(x).float(), ref, atol=tol)
    assert torch.equal(module.codes(), codes.to(torch.int8))
    if dtype == torch.float32:
        assert torch.allclose(module.dequantize(), weight)


def test_int8_rejects_bad_codes():
    with pytest.raises(ValueError):
        Int8Linear(128, 16, False, 128, torch.float32).set_codes(torch.full((16, 128), 200), torch.ones(16, 1))


def test_quantize_rtn_replaces_language_linears_only():
    from grace.tiny import tiny_qwen3vl

    model, _ = tiny_qwen3vl(0)
    names = quantize_(model, Int4WeightOnlyConfig())
    assert names and all(isinstance(model.get_submodule(n), Int4Linear) for n in names)
    assert not any(k in n for n in names for k in ("visual", "lm_head", "embed_tokens", "merger"))


@pytest.mark.parametrize("bits,config", [(4, Int4WeightOnlyConfig()), (8, Int8WeightOnlyConfig())])
def test_quantize_rtn_error_is_within_half_a_step(bits, config):
    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Linear(256, 32))
    weight = linear[0].weight.detach().clone()
    quantize_(linear, config)
    qmax = 2 ** (bits - 1) - 1
    scales = weight.reshape(32, 2, 128).abs().amax(-1) / qmax          # max|w| / qmax per group, computed here
    step = scales.repeat_interleave(128, 1)
    err = (linear[0].dequantize().float() - weight).abs()
    # half a step, plus (int4) what rounding the scale to fp16 moves the largest code
    assert (err <= step / 2 + step * 8 * 2 ** -11 + 1e-6).all()


@pytest.mark.gpu
def test_int4_cuda_kernel_matches_reference():
    module, weight = make_int4(256, 64, 128, torch.bfloat16)
    cpu_codes = module.codes().clone()
    module.to("cuda")
    assert module.layout == "cuda"
    assert torch.equal(module.codes().cpu(), cpu_codes)
    x = torch.randn(3, 256, dtype=torch.bfloat16, device="cuda")
    ref = x.float() @ module.dequantize().float().t() + module.bias.float()
    assert torch.allclose(module(x).float(), ref, atol=0.05, rtol=0.02)
    module.to("cpu")
    assert module.layout == "cpu" and torch.equal(module.codes(), cpu_codes)


@pytest.mark.gpu
def test_int8_cuda_matches_reference():
    codes = torch.randint(-128, 128, (64, 256))
    module = Int8Linear(256, 64, False, 128, torch.bfloat16).set_codes(codes, torch.rand(64, 2) * 0.01).to("cuda")
    x = torch.randn(3, 256, dtype=torch.bfloat16, device="cuda")
    ref = x.float() @ module.dequantize().float().t()
    assert torch.allclose(module(x).float(), ref, atol=0.05 * ref.abs().max().item())


@pytest.mark.gpu
def test_fixture_loads_on_cuda(fixtures_dir):
    import grace

    loaded = grace.load(fixtures_dir / "qwen3vl-tiny-grace-w4g128-awq", device="cuda")
    assert loaded.device.type == "cuda"
    assert all(loaded.model.get_submodule(n).layout == "cuda" for n in loaded.quantized_modules)
