"""Quantization primitives: code ranges, group reshaping, round-to-nearest codes and their scales.

Every place in grace that turns weights into integer codes goes through here: `quantize_`,
the QAT fake quantizer, the checkpoint loaders and exporters, and the benchmarks.

A weight W [out, in] is split into groups of `group_size` consecutive input columns; group
(o, j) is W[o, j*g : (j+1)*g] and has one scale s[o, j] (and, asymmetric, one zero point z[o, j]):

    symmetric   q = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1)       W ~ q * s
    asymmetric  q = clamp(round(W / s) + z, 0, 2^b - 1)              W ~ (q - z) * s

Scales and zero points are [out, in / group_size] fp32; codes are [out, in] (int8 signed,
uint8 asymmetric).
"""

from __future__ import annotations

import torch

# Smallest scale round-to-nearest hands out: an all-zero group still gets a finite, positive step
# (its codes are 0, or the zero point, whatever the step).
MIN_SCALE = 1e-6    # (representable in fp16, which AWQ scales are stored in)


def code_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of `bits`-bit codes: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def to_groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> fp32 [out, in / group_size, group_size] (group (o, j) = input columns j*g .. j*g+g-1)."""
    out_f, in_f = weight.shape
    if group_size <= 0 or in_f % group_size:
        raise ValueError(f"in_features={in_f} is not a multiple of group_size={group_size}")
    return weight.float().reshape(out_f, in_f // group_size, group_size)


def per_column(per_group: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, groups] -> [out, groups * group_size]: each group's value over its own input columns."""
    return per_group.repeat_interleave(group_size, dim=-1)


def round_codes(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                zeros: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest codes of `weight` [out, in] for the given steps (and zero points).

    zeros None: symmetric signed codes, int8. zeros [out, groups]: asymmetric unsigned codes, uint8.
    """
    w = to_groups(weight, group_size)
    step = scales.float().reshape(w.shape[:2]).unsqueeze(-1)
    q = torch.round(w / step)
    if zeros is None:
        qmin, qmax = code_range(bits)
        dtype = torch.int8
    else:
        q = q + zeros.float().reshape(w.shape[:2]).unsqueeze(-1)
        qmin, qmax = code_range(bits, signed=False)
        dtype = torch.uint8
    return q.clamp(qmin, qmax).to(dtype).reshape(weight.shape)


def symmetric_scales(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-group step max|W| / qmax (fp32 [out, groups]), so the largest weight lands on the top code."""
    return (to_groups(weight, group_size).abs().amax(-1) / code_range(bits)[1]).clamp_min(MIN_SCALE)


def asymmetric_scales(weight: torch.Tensor, bits: int, group_size: int,
                      scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (step, zero point) from the group's range [min(W, 0), max(W, 0)] over 2^b - 1 steps.

    The range always holds 0, so 0 is exactly representable (the zero point is an integer code).
    scale_dtype rounds the steps to that dtype first (AWQ stores fp16 steps), and the zero points
    are computed from the rounded steps."""
    w = to_groups(weight, group_size)
    qmax = code_range(bits, signed=False)[1]
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scales = ((hi - lo) / qmax).clamp_min(MIN_SCALE)
    if scale_dtype is not None:
        scales = scales.to(scale_dtype).float()
    zeros = torch.round(-lo / scales).clamp(0, qmax)
    return scales, zeros


def quantize_symmetric(weight: torch.Tensor, bits: int, group_size: int,
                       scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: (codes int8 [out, in], scales fp32 [out, groups]).
    scale_dtype rounds the steps to that dtype before the codes are taken (what a layout storing
    fp16 scales will hold), so a saved model computes exactly what the in-memory one did."""
    scales = symmetric_scales(weight, bits, group_size)
    if scale_dtype is not None:
        scales = scales.to(scale_dtype).float()
    return round_codes(weight, scales, bits, group_size), scales


def quantize_asymmetric(weight: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest: (codes uint8 [out, in], scales fp32 [out, groups], zero points fp32 [out, groups])."""
    scales, zeros = asymmetric_scales(weight, bits, group_size, scale_dtype)
    return round_codes(weight, scales, bits, group_size, zeros), scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int,
               zeros: torch.Tensor | None = None) -> torch.Tensor:
    """Reference decode, fp32 [out, in]: q * s (symmetric) or (q - z) * s (asymmetric)."""
    q = codes.float()
    if zeros is not None:
        q = q - per_column(zeros.float(), group_size)
    return q * per_column(scales.float(), group_size)


def signed_to_unsigned(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric signed codes -> unsigned codes with the constant zero point 2^(b-1) (q + 8 at 4 bits),
    the way AWQ-style layouts store a symmetric grid."""
    return (codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)


def zero_points_from_offsets(scales: torch.Tensor, offsets: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zero points z back from float offsets o = (2^(b-1) - z) * s (tinygemm's convention)."""
    return torch.round(2 ** (bits - 1) - offsets.float() / scales.float()).clamp(*code_range(bits, signed=False))


def grid_steps(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The step of each group of a weight that already lies on a symmetric grid code * s (a QAT
    release stored without its scales): s = max|W| / c for the largest c in 1..2^(bits-1) that puts
    every weight of the group on the grid (within the error of bf16 storage). Any such c
    reproduces the same weights; the finest wins ties. All-zero groups get step 1."""
    w = to_groups(weight, group_size)
    qmin, qmax = code_range(bits)
    peak = w.abs().amax(dim=-1)
    best = torch.zeros_like(peak)
    best_err = torch.full_like(peak, float("inf"))
    for c in range(-qmin, 0, -1):                               # larger c first: finest fitting grid wins ties
        step = (peak / c).clamp_min(1e-12)
        q = torch.round(w / step.unsqueeze(-1)).clamp(qmin, qmax)
        err = (q * step.unsqueeze(-1) - w).abs().amax(-1) / step  # worst miss, in steps
        better = err < best_err - 1e-3
        best = torch.where(better, step, best)
        best_err = torch.where(better, err, best_err)
    return torch.where(peak > 0, best, torch.ones_like(best))


def codes_on_grid(weight: torch.Tensor, bits: int, group_size: int, scales: torch.Tensor | None = None):
    """weight [out, in] on the grid code * s -> (codes int8 [out, in], scales fp32 [out, groups]).
    With `scales` (a QAT release's exp(log_scale), flat or [out, groups]) the codes are round(W / s);
    without them each group's step is inferred (`grid_steps`)."""
    steps = grid_steps(weight, bits, group_size) if scales is None else scales.float()
    steps = steps.reshape(weight.shape[0], weight.shape[1] // group_size)
    return round_codes(weight, steps, bits, group_size), steps
