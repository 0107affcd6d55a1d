"""`quantize_(model, config)`: round-to-nearest weight-only quantization of a model's linears, in place.

This is the post-training (PTQ) baseline: symmetric per-group scales s = max|w| / qmax,
codes round(w / s) clamped to the signed range. GRACE's own low-bit weights come from
QAT (`grace.distill.fake_quant`) and are loaded from its release layouts instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .int4 import Int4Linear
from .int8 import Int8Linear

DEFAULT_SKIP = ("visual", "merger", "lm_head", "embed_tokens")


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    group_size: int = 128
    skip_keywords: tuple[str, ...] = DEFAULT_SKIP
    bits = 4


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    group_size: int = 128
    skip_keywords: tuple[str, ...] = DEFAULT_SKIP
    bits = 8


def rtn_codes(weight: torch.Tensor, bits: int, group_size: int, fp16_scales: bool = False):
    """Symmetric round-to-nearest: (codes int8 [out, in] in [-2^(b-1), 2^(b-1)-1], scales fp32 [out, in/group]).
    fp16_scales rounds the scales to fp16 first, as the AWQ layout stores them, so a saved INT4 model
    computes exactly what the in-memory one did."""
    out_f, in_f = weight.shape
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    scales = (w.abs().amax(-1) / qmax).clamp_min(1e-6)
    if fp16_scales:
        scales = scales.half().float()
    codes = torch.round(w / scales.unsqueeze(-1)).clamp(-qmax - 1, qmax)
    return codes.to(torch.int8).reshape(out_f, in_f), scales


def quantize_(model: nn.Module, config: Int4WeightOnlyConfig | Int8WeightOnlyConfig) -> list[str]:
    """Replace every nn.Linear whose name contains none of `config.skip_keywords` by its
    round-to-nearest Int4Linear / Int8Linear, on the linear's own device and dtype. Returns the names."""
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(k in n for k in config.skip_keywords)]
    for name, linear in targets:
        if linear.in_features % config.group_size:
            raise ValueError(f"{name}: in_features={linear.in_features} is not a multiple of {config.group_size}")
        codes, scales = rtn_codes(linear.weight, config.bits, config.group_size, fp16_scales=config.bits == 4)
        dtype, device, has_bias = linear.weight.dtype, linear.weight.device, linear.bias is not None
        if config.bits == 4:
            new = Int4Linear(linear.in_features, linear.out_features, has_bias, config.group_size, dtype, device)
            new.set_codes((codes.to(torch.int16) + 8).to(torch.uint8), scales, torch.full_like(scales, 8))
        else:
            new = Int8Linear(linear.in_features, linear.out_features, has_bias, config.group_size, dtype, device)
            new.set_codes(codes, scales)
        if has_bias:
            new.bias.data = linear.bias.detach().to(dtype)
        replace_module(model, name, new)
    return [n for n, _ in targets]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (dotted path) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
