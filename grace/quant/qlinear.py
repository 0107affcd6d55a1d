"""What Int4Linear and Int8Linear share: shape bookkeeping, the bias, code checks, `from_codes` and the
storage layout that follows the tensors' device and dtype."""

from __future__ import annotations

import threading
from typing import ClassVar

import torch
from torch import nn

from . import kernels

_RESTORE_LOCK = threading.Lock()


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is `bits`-bit integer codes with one scale per group of
    `group_size` input columns. Subclasses hold the codes in their kernel's storage layout, chosen for
    the device and dtype the tensors live on (`layout_for`), and convert between it and the plain
    layout (`_store` / `_plain`); a Module.to() re-stores them, and so does the first forward after the
    tensors were moved behind the module's back (ZeroGPU moves tensors that way)."""

    bits: ClassVar[int]
    _decode_kernel: ClassVar[tuple[str, str, str]]     # (kind, codes buffer, params buffer) for decode_gemv
    layout: str
    _stored_for: tuple

    def layout_for(self, device: torch.device, dtype: torch.dtype) -> str:
        raise NotImplementedError

    def _store(self, codes: torch.Tensor, params: torch.Tensor) -> None:
        """Hold plain codes [out, in] and group parameters (the subclass's plain layout) in the layout
        `layout_for` picks for the codes' device and the parameters' dtype."""
        layout = self.layout_for(codes.device, params.dtype)
        self._hold(layout, codes, params)
        self.layout, self._stored_for = layout, (codes.device, params.dtype)

    def _hold(self, layout: str, codes: torch.Tensor, params: torch.Tensor) -> None:
        """Set the subclass's buffers to `codes` and `params` (plain) in `layout`."""
        raise NotImplementedError

    def _plain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [out, in], group parameters) in the plain layout, wherever they are held."""
        raise NotImplementedError

    def _tensors_now(self) -> tuple:
        raise NotImplementedError

    def _restore_if_moved(self) -> None:
        """The bytes are in the layout of the device and dtype they were stored for; once their tensors sit
        elsewhere, read them in that layout and store them again for where they are, once."""
        if self._tensors_now() == self._stored_for:
            return
        with _RESTORE_LOCK:                                     # one thread re-stores, the others see the result
            here = self._tensors_now()
            if here == self._stored_for:
                return
            device, dtype = here
            if self.layout_for(device, dtype) != self.layout:
                codes, params = self._plain()
                self._store(codes.to(device), params.to(device, dtype))
            self._stored_for = here

    def _bf16_kernel_takes(self, x: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, max_rows: int) -> bool:
        """Whether a forward can go straight to grace's kernels with a bf16 output: the tiled layout (only ever
        stored for CPU bf16, so this also means nothing was moved), CPU bf16 input of at most `max_rows` rows,
        no bias, no autograd. Kept to plain attribute reads: it runs ~200 times a decoded token."""
        return (self.layout == "tiled" and x.dtype is torch.bfloat16 and x.shape[-1] == self.in_features
                and x.numel() <= max_rows * self.in_features and self.bias is None and codes.is_cpu
                and params.dtype is torch.bfloat16 and x.is_cpu
                and not (x.requires_grad and torch.is_grad_enabled()))

    def decode_gemv(self, x: torch.Tensor) -> tuple | None:
        """(kind, codes, params, out_features, group_size) when this forward of `x` would be one GEMV call of
        grace's kernels (kernels.gemv_many can then take it together with its siblings), else None."""
        kind, codes, params = self._decode_kernel
        codes, params = self._buffers[codes], self._buffers[params]
        if self._bf16_kernel_takes(x, codes, params, kernels.gemv_max_rows(kind)):
            return kind, codes, params, self.out_features, self.group_size
        return None

    def _apply(self, fn, recurse=True):
        device = self._tensors_now()[0]
        if fn(torch.empty(0, device=device)).device == device:
            return super()._apply(fn, recurse)   # a dtype change: the next forward re-stores if the layout changes
        codes, params = self._plain()             # read in this device's layout, before the bytes move
        super()._apply(fn, recurse)
        device, dtype = self._tensors_now()
        self._store(codes.to(device), params.to(device, dtype))
        return self

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        super().__init__()
        if group_size <= 0 or in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None, *,
                   bias: torch.Tensor | None = None, group_size: int = 128, dtype: torch.dtype = torch.bfloat16,
                   device: torch.device | str | None = None):
        """A module holding `codes` [out, in] with `scales` [out, in/group_size] (and, where the
        subclass has them, integer `zeros` [out, in/group_size]); `bias` [out] optional.
        Placed on `device` (default: the codes' device), scales and bias held in `dtype`."""
        out_f, in_f = codes.shape
        device = codes.device if device is None else torch.device(device)
        # built on the meta device: its placeholder weight costs nothing, and the real one is stored once
        module = cls(in_f, out_f, bias is not None, group_size, dtype, "meta")
        module.set_codes(codes, scales, zeros, device=device)
        if bias is not None:
            if tuple(bias.shape) != (out_f,):
                raise ValueError(f"bias shape {tuple(bias.shape)} != {(out_f,)}")
            module.bias = nn.Parameter(bias.detach().to(device, dtype), requires_grad=False)
        return module

    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                  device: torch.device | str | None = None):
        """Hold these codes (and group scales / zero points), on `device` (default: where the module is)."""
        raise NotImplementedError

    def _check_codes(self, codes: torch.Tensor, qmin: int, qmax: int, **per_group: torch.Tensor | None) -> None:
        """Shapes [out, in] / [out, groups] and the code range; values are not read on the meta device."""
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise ValueError(f"codes shape {tuple(codes.shape)} != {(self.out_features, self.in_features)}")
        for name, tensor in per_group.items():
            if tensor is not None and tuple(tensor.shape) != (self.out_features, self.groups):
                raise ValueError(f"{name} shape {tuple(tensor.shape)} != {(self.out_features, self.groups)}")
        if codes.numel() and codes.device.type != "meta" and (codes.min() < qmin or codes.max() > qmax):
            raise ValueError(f"{self.bits}-bit codes must lie in [{qmin}, {qmax}]")

    def codes(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")
