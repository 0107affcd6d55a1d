"""Random Int4Linear / Int8Linear modules and their exact group-wise weights, for the kernel tests."""

import torch

from grace.quant.int4 import Int4Linear
from grace.quant.int8 import Int8Linear


def int4_module(in_f, out_f, group, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    scales = torch.rand(out_f, in_f // group, generator=g) * 0.05 + 0.01
    zeros = torch.randint(0, 16, (out_f, in_f // group), generator=g).float()
    module = Int4Linear(in_f, out_f, bias, group, torch.bfloat16).set_codes(codes, scales, zeros)
    if bias:
        module.bias.data.normal_(generator=g)
    return module


def int8_module(in_f, out_f, group, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (out_f, in_f), generator=g, dtype=torch.int16)
    scales = torch.rand(out_f, in_f // group, generator=g) * 0.01 + 0.001
    module = Int8Linear(in_f, out_f, bias, group, torch.bfloat16).set_codes(codes, scales)
    if bias:
        module.bias.data.normal_(generator=g)
    return module


def exact_group_weight(module) -> torch.Tensor:
    """The group-wise weight in fp64, from codes and scales (no bf16 rounding of the product)."""
    gs = module.group_size
    if isinstance(module, Int8Linear):
        return module.codes().double() * module.group_scales().double().t().repeat_interleave(gs, 1)
    sz = module.scales_zeros().double()
    return ((module.codes().double() - 8) * sz[..., 0].t().repeat_interleave(gs, 1)
            + sz[..., 1].t().repeat_interleave(gs, 1))


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
