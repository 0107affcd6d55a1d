"""`quantize_(model, config, filter_fn=None)`: swap a model's linears for quantized modules, in place.

Which linears: every nn.Linear none of whose dotted name components matches one of
`config.skip_keywords` (`name_matches`: "visual" skips `model.visual.*`, not `model.revisual`),
or, with `filter_fn(module, name)`, those it returns True for. The same rule picks the linears
QAT fake-quantizes and the ones a QAT release without a sidecar holds on its grid.

What they become: the handler registered for `type(config)` (`@register_handler(ConfigType)`),
called as handler(linear, config) -> new module. Handlers here give the round-to-nearest (PTQ)
baseline; GRACE's own low-bit weights come from QAT (`grace.distill.fake_quant`, whose
`QATConfig` has its own handler) and are loaded from its release formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from . import primitives as P
from .int4 import Int4Linear
from .int8 import Int8Linear

DEFAULT_SKIP = ("visual", "merger", "lm_head", "embed_tokens")

FilterFn = Callable[[nn.Module, str], bool]
_HANDLERS: dict[type, Callable[[nn.Linear, object], nn.Module]] = {}


def name_matches(name: str, patterns) -> bool:
    """True when a pattern is a run of whole dotted components of `name` ("visual" matches
    "model.visual.x", "mlp.up_proj" matches "layers.0.mlp.up_proj"; "vis" matches nothing)."""
    parts = name.split(".")
    for pattern in patterns:
        want = pattern.split(".")
        if any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1)):
            return True
    return False


def target_linears(model: nn.Module, skip=DEFAULT_SKIP, filter_fn: FilterFn | None = None) -> list[str]:
    """Names of the nn.Linear modules to quantize: those `filter_fn(module, name)` accepts when it
    is given, else those whose name has no component run in `skip`."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and (filter_fn(module, name) if filter_fn is not None else not name_matches(name, skip))]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (dotted path) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def register_handler(config_type: type):
    """Decorator: `handler(linear, config) -> module` is what `quantize_` does for configs of `config_type`."""
    def register(handler):
        _HANDLERS[config_type] = handler
        return handler
    return register


def quantize_(model: nn.Module, config, filter_fn: FilterFn | None = None) -> list[str]:
    """Replace the targeted linears (module docstring) by what `config`'s handler makes of them.
    Checks every target first (group size), so a bad config changes nothing. Returns the names."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"no quantize_ handler for {type(config).__name__}; "
                        f"registered: {', '.join(t.__name__ for t in _HANDLERS)}")
    names = target_linears(model, config.skip_keywords, filter_fn)
    group = config.group_size
    bad = [n for n in names if model.get_submodule(n).in_features % group]
    if bad:
        raise ValueError(f"{len(bad)} linear(s) have in_features not divisible by group_size={group}, "
                         f"e.g. '{bad[0]}' ({model.get_submodule(bad[0]).in_features})")
    for name in names:
        replace_module(model, name, handler(model.get_submodule(name), config))
    return names


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """Round-to-nearest 4-bit weights, one scale per `group_size` input columns, held as Int4Linear.
    symmetric: q in [-8, 7], W = q*s (the GRACE AWQ release's grid); False: per-group zero points
    from the group's min/max, W = (q - z)*s (transformers AWQ style). Scales are rounded to fp16
    first, as the AWQ format stores them, so a saved model computes what the in-memory one did."""

    group_size: int = 128
    symmetric: bool = True
    skip_keywords: tuple[str, ...] = DEFAULT_SKIP
    bits: ClassVar[int] = 4


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """Round-to-nearest symmetric 8-bit weights (q in [-128, 127], W = q*s), held as Int8Linear."""

    group_size: int = 128
    skip_keywords: tuple[str, ...] = DEFAULT_SKIP
    bits: ClassVar[int] = 8


def _module_args(linear: nn.Linear, group_size: int) -> dict:
    return dict(bias=linear.bias, group_size=group_size, dtype=linear.weight.dtype, device=linear.weight.device)


@register_handler(Int4WeightOnlyConfig)
@torch.no_grad()
def _int4_weight_only(linear: nn.Linear, config: Int4WeightOnlyConfig) -> Int4Linear:
    if config.symmetric:
        codes, scales = P.quantize_symmetric(linear.weight, 4, config.group_size, scale_dtype=torch.float16)
        return Int4Linear.from_codes(P.signed_to_unsigned(codes, 4), scales, **_module_args(linear, config.group_size))
    codes, scales, zeros = P.quantize_asymmetric(linear.weight, 4, config.group_size, scale_dtype=torch.float16)
    return Int4Linear.from_codes(codes, scales, zeros, **_module_args(linear, config.group_size))


@register_handler(Int8WeightOnlyConfig)
@torch.no_grad()
def _int8_weight_only(linear: nn.Linear, config: Int8WeightOnlyConfig) -> Int8Linear:
    codes, scales = P.quantize_symmetric(linear.weight, 8, config.group_size)
    return Int8Linear.from_codes(codes, scales, **_module_args(linear, config.group_size))
