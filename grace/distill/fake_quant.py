"""Quantization-aware training: symmetric signed per-group fake quantization with learned scales.

A quantized linear's weight W [out, in] is split into groups of `group_size` consecutive input
columns (group (o, j) = W[o, j*g : (j+1)*g]), each with its own step s = exp(log_scale[o, j]):

    code   = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1)
    W_dq   = code * s

Training sees W_dq in the forward pass and learns both W and log_scale (LSQ, Esser et al.,
ICLR 2020), with the straight-through estimator for round:

    dW_dq / dW = 1 where W / s lies inside [qmin, qmax], else 0   (LSQ clips the weight gradient)
    dW_dq / ds = round(W / s) - W / s inside, qmin or qmax outside
    d / dlog_scale = s * d / ds, times the optional LSQ gradient scale 1 / sqrt(g * qmax)

The release keeps W_dq ("grid" weights) and log_scale, from which the integer codes are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.primitives import code_range, dequantize, round_codes, to_groups
from ..quant.quantize import DEFAULT_SKIP, name_matches, quantize_, register_handler, replace_module, target_linears

SCALE_FLOOR = 1e-8   # lower bound of an initial step, so all-zero groups get a finite log_scale


@dataclass
class QATConfig:
    """How `apply_qat` fake-quantizes a model; bits=16 turns QAT off."""

    bits: int = 4
    group_size: int = 128
    skip_keywords: tuple[str, ...] = DEFAULT_SKIP     # whole name components (grace.quant.name_matches)
    lsq_grad_scale: bool = True
    init_candidates: int = 20
    init_range: tuple[float, float] = (0.3, 1.2)

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8, 16):
            raise ValueError(f"QAT bits must be 2, 3, 4, 8 or 16 (no quantization), got {self.bits}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        self.skip_keywords = tuple(self.skip_keywords)
        self.init_range = tuple(self.init_range)

    @property
    def enabled(self) -> bool:
        return self.bits < 16


def fake_quantize(weight: torch.Tensor, log_scale: torch.Tensor, bits: int, group_size: int,
                  grad_scale: float = 1.0) -> torch.Tensor:
    """W_dq = clamp(round(W / s), qmin, qmax) * s with s = exp(log_scale), in fp32, shaped like W.

    round passes gradients straight through; clamp blocks them outside the code range, so the
    gradients are LSQ's (module docstring). grad_scale multiplies log_scale's gradient only.
    """
    qmin, qmax = code_range(bits)
    if grad_scale != 1.0:
        # Same value, gradient scaled by grad_scale.
        log_scale = log_scale.detach() + (log_scale - log_scale.detach()) * grad_scale
    scale = log_scale.float().exp().unsqueeze(-1)                              # [out, groups, 1]
    ratio = (to_groups(weight, group_size) / scale).clamp(qmin, qmax)
    code = ratio + (torch.round(ratio) - ratio).detach()                       # exact: round(ratio) in forward
    return (code * scale).reshape(weight.shape)


def init_log_scale_mse(weight: torch.Tensor, bits: int, group_size: int, candidates: int = 20,
                       lo: float = 0.3, hi: float = 1.2) -> torch.Tensor:
    """Per-group log step minimising ||W_dq - W||^2 over s = c * max|W| / qmax, c in linspace(lo, hi, candidates).

    Returns fp32 [out, in / group_size]. Ties keep the smaller c. A group of zeros gets
    s = 1e-8 * c / qmax (any step reproduces it).
    """
    weight = weight.detach()
    w = to_groups(weight, group_size)
    qmax = code_range(bits)[1]
    peak = w.abs().amax(-1).clamp_min(SCALE_FLOOR)
    best_scale = peak / qmax
    best_err = torch.full_like(peak, float("inf"))
    for c in torch.linspace(lo, hi, candidates).tolist():
        scale = peak * (c / qmax)
        w_dq = dequantize(round_codes(weight, scale, bits, group_size), scale, group_size)
        err = (to_groups(w_dq, group_size) - w).square().sum(-1)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
    return best_scale.log()


class FakeQuantLinear(nn.Module):
    """nn.Linear whose forward uses the fake-quantized weight; holds the original `weight` parameter."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, log_scale: torch.Tensor,
                 bits: int = 4, group_size: int = 128, lsq_grad_scale: bool = True):
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        if tuple(log_scale.shape) != (out_features, in_features // group_size):
            raise ValueError(f"log_scale shape {tuple(log_scale.shape)}, expected "
                             f"{(out_features, in_features // group_size)}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = bias
        self.log_scale = nn.Parameter(log_scale.detach().to(device=weight.device, dtype=torch.float32))
        # LSQ: gradient scale 1 / sqrt(elements per step * qmax), so the step learns at the weights' pace.
        self.grad_scale = 1.0 / math.sqrt(group_size * code_range(bits)[1]) if lsq_grad_scale else 1.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig) -> "FakeQuantLinear":
        """Wrap `linear` (sharing its weight and bias parameters), scales initialised by MSE search."""
        lo, hi = config.init_range
        log_scale = init_log_scale_mse(linear.weight, config.bits, config.group_size, config.init_candidates, lo, hi)
        return cls(linear.weight, linear.bias, log_scale, config.bits, config.group_size, config.lsq_grad_scale)

    def fake_quantized_weight(self) -> torch.Tensor:
        """W_dq in the weight's dtype, differentiable w.r.t. weight and log_scale."""
        return fake_quantize(self.weight, self.log_scale, self.bits, self.group_size,
                             self.grad_scale).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_quantized_weight(), self.bias)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """W_dq = code * s, detached, in the weight's dtype."""
        return self.fake_quantized_weight()

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """Integer codes, int8 [out, in]."""
        return round_codes(self.weight, self.scales(), self.bits, self.group_size)

    @torch.no_grad()
    def scales(self) -> torch.Tensor:
        """Steps s = exp(log_scale), fp32 [out, in / group_size]."""
        return self.log_scale.float().exp()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")


def qat_target_names(model: nn.Module, config: QATConfig) -> list[str]:
    """Names of the nn.Linear modules `apply_qat` would replace: `quantize_`'s rule, none of
    `config.skip_keywords` among their name components."""
    return target_linears(model, config.skip_keywords)


register_handler(QATConfig)(FakeQuantLinear.from_linear)


def apply_qat(model: nn.Module, config: QATConfig) -> list[str]:
    """`quantize_(model, config)`: the targeted nn.Linear modules become FakeQuantLinear in place;
    returns their names. bits=16 does nothing. Raises ValueError (before changing anything) when
    a targeted linear's in_features is not a multiple of group_size."""
    return quantize_(model, config) if config.enabled else []


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def qat_param_groups(model: nn.Module, lr: float, scale_lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: "decay" (matrices), "no_decay" (biases, norms, other 1-D) and
    "log_scale" (QAT steps: lr=scale_lr, no weight decay). Frozen parameters and empty groups are left out."""
    decay, no_decay, scales = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("log_scale"):
            scales.append(param)
        elif param.dim() < 2 or name.endswith(".bias") or "norm" in name.lower():
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
              {"name": "log_scale", "params": scales, "lr": scale_lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def qat_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The release sidecar, on CPU: `<module>.weight` = W_dq (bf16, [out, in]) and
    `<module>.log_scale` = fp32 flat [out * in / group_size] (row-major over [out, groups])."""
    state = {}
    for name, module in fake_quant_modules(model).items():
        state[f"{name}.weight"] = module.quantized_weight().to(device="cpu", dtype=torch.bfloat16).contiguous()
        state[f"{name}.log_scale"] = module.log_scale.detach().float().cpu().reshape(-1).clone()
    return state


@torch.no_grad()
def strip_qat(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear by a plain nn.Linear holding W_dq (the grid weights), in place."""
    for name, module in fake_quant_modules(model).items():
        weight = module.quantized_weight()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        linear.weight.requires_grad_(module.weight.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        replace_module(model, name, linear)
    return model


def mean_quant_scale(model: nn.Module) -> float:
    """Mean step exp(log_scale) over every group of every FakeQuantLinear (NaN when there is none)."""
    scales = [m.scales().reshape(-1) for m in fake_quant_modules(model).values()]
    return torch.cat(scales).mean().item() if scales else float("nan")


def freeze_vision(model: nn.Module, keyword: str = "visual") -> int:
    """Set requires_grad=False on parameters with `keyword` among their name components; return how many."""
    frozen = 0
    for name, param in model.named_parameters():
        if name_matches(name, [keyword]):
            param.requires_grad_(False)
            frozen += 1
    return frozen
