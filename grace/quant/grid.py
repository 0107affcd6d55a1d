"""Recovering integer codes from weights that already lie on a symmetric group-wise grid (QAT releases)."""

from __future__ import annotations

import torch


def codes_on_grid(weight: torch.Tensor, bits: int, group_size: int, scales: torch.Tensor | None = None):
    """weight [out, in] on the grid code * scale -> (codes int8 [out, in], scales fp32 [out, in/group]).

    With `scales` given (a QAT release's exp(log_scale), flat or [out, in/group]) the codes are
    round(W / s). Without them the step of each group is inferred: s = max|W| / c for the
    largest c in 1..2^(bits-1) that puts every weight of the group on the grid (within the
    error of bf16 storage); any such c reproduces the same weights.
    """
    out_f, in_f = weight.shape
    groups = in_f // group_size
    w = weight.float().reshape(out_f, groups, group_size)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if scales is None:
        scales = _infer_steps(w, qmax)
    scales = scales.float().reshape(out_f, groups)
    codes = torch.round(w / scales.unsqueeze(-1)).clamp(qmin, qmax)
    return codes.to(torch.int8).reshape(out_f, in_f), scales


def _infer_steps(w: torch.Tensor, qmax: int) -> torch.Tensor:
    peak = w.abs().amax(dim=-1)                                   # [out, groups]
    best = torch.zeros_like(peak)
    best_err = torch.full_like(peak, float("inf"))
    for c in range(qmax + 1, 0, -1):                              # larger c first: finest fitting grid wins ties
        step = (peak / c).clamp_min(1e-12)
        q = torch.round(w / step.unsqueeze(-1)).clamp(-(qmax + 1), qmax)
        err = ((q * step.unsqueeze(-1) - w).abs().amax(-1)) / step  # worst miss, in steps
        better = err < best_err - 1e-3
        best = torch.where(better, step, best)
        best_err = torch.where(better, err, best_err)
    return torch.where(peak > 0, best, torch.ones_like(best))
