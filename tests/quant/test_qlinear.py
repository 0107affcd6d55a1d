"""Int4Linear.from_codes / Int8Linear.from_codes and what their shared base checks."""

import pytest
import torch

from grace.quant import Int4Linear, Int8Linear, QuantizedLinear


def test_both_share_the_base():
    assert issubclass(Int4Linear, QuantizedLinear) and issubclass(Int8Linear, QuantizedLinear)
    assert (Int4Linear.bits, Int8Linear.bits) == (4, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_from_codes_holds_codes_scales_zeros_and_bias(dtype):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 256), generator=g, dtype=torch.uint8)
    scales = torch.rand(32, 2, generator=g) * 0.01 + 0.001
    zeros = torch.randint(0, 16, (32, 2), generator=g).float()
    bias = torch.randn(32, generator=g)
    module = Int4Linear.from_codes(codes, scales, zeros, bias=bias, group_size=128, dtype=dtype)
    assert (module.in_features, module.out_features, module.group_size) == (256, 32, 128)
    assert torch.equal(module.codes(), codes)
    assert module.bias.dtype == dtype and torch.equal(module.bias, bias.to(dtype)) and not module.bias.requires_grad
    expected = (codes.float() - zeros.repeat_interleave(128, 1)) * scales.repeat_interleave(128, 1)
    tol = 1e-6 if dtype == torch.float32 else 0.02 * expected.abs().max().item()
    torch.testing.assert_close(module.dequantize().float(), expected, rtol=0, atol=tol)


def test_int4_zeros_default_to_the_symmetric_midpoint():
    codes = torch.tensor([[0, 8, 15, 9] * 4], dtype=torch.uint8).repeat(16, 1)
    module = Int4Linear.from_codes(codes, torch.full((16, 1), 0.5), group_size=16, dtype=torch.float32)
    assert module.bias is None
    assert module.dequantize()[0, :4].tolist() == [-4.0, 0.0, 3.5, 0.5]


def test_int8_from_codes_and_its_refusals():
    codes = torch.randint(-128, 128, (16, 128), generator=torch.Generator().manual_seed(1))
    scales = torch.rand(16, 1) * 0.01
    module = Int8Linear.from_codes(codes, scales, group_size=128, dtype=torch.float32)
    assert torch.equal(module.codes(), codes.to(torch.int8))
    torch.testing.assert_close(module.dequantize(), codes.float() * scales)
    with pytest.raises(ValueError, match="no zero points"):
        Int8Linear.from_codes(codes, scales, torch.zeros(16, 1))
    with pytest.raises(ValueError, match=r"\[-128, 127\]"):
        Int8Linear.from_codes(torch.full((16, 128), 200), scales)


@pytest.mark.parametrize("cls,codes", [(Int4Linear, torch.zeros(16, 128, dtype=torch.uint8)),
                                       (Int8Linear, torch.zeros(16, 128, dtype=torch.int8))])
def test_shape_and_range_checks(cls, codes):
    with pytest.raises(ValueError, match="scales shape"):
        cls.from_codes(codes, torch.ones(16, 2))
    with pytest.raises(ValueError, match="bias shape"):
        cls.from_codes(codes, torch.ones(16, 1), bias=torch.zeros(8))
    with pytest.raises(ValueError, match="multiple of group_size"):
        cls.from_codes(torch.zeros(16, 100, dtype=codes.dtype), torch.ones(16, 1))
    if cls is Int4Linear:
        with pytest.raises(ValueError, match=r"\[0, 15\]"):
            cls.from_codes(torch.full((16, 128), 16), torch.ones(16, 1))
        with pytest.raises(ValueError, match="zeros shape"):
            cls.from_codes(codes, torch.ones(16, 1), torch.ones(16, 3))


def test_meta_device_skips_value_checks_but_keeps_shapes():
    codes = torch.empty(64, 256, dtype=torch.uint8, device="meta")
    module = Int4Linear.from_codes(codes, torch.empty(64, 2, device="meta"))
    assert module.weight_packed.is_meta and module.layout == "plain"
    assert "layout=plain" in repr(module) and "group_size=128" in repr(module)
