"""4-bit weight-only linear on torch's tinygemm int4 kernels.

The weight is held as 4-bit codes q in [0, 15] with a scale s and a float zero
offset z per group of `group_size` input columns, in tinygemm's convention:

    W[o, i] = (q[o, i] - 8) * s[o, g] + z[o, g],   g = i // group_size

An AWQ/integer zero point zp maps onto it exactly as z = (8 - zp) * s.

Storage follows the device: on CUDA the layout of `_convert_weight_to_int4pack` (run by
`_weight_int4pack_mm`); on CPU, for bf16 modules where grace's own kernels run (quant/kernels.py),
the plain nibble layout they read (GEMV for a few rows, dequantize + bf16 GEMM above
`KERNEL_MAX_ROWS`), otherwise the layout of `_convert_weight_to_int4pack_for_cpu` (run by
`_weight_int4pack_mm_for_cpu`); shapes no kernel takes keep the plain layout and run through
`dequantize()`, which is also the reference every kernel is tested against. All hold half a byte
per weight. The layout is checked against the tensors' device at every forward and repacked once
if they were moved without `Module.to()` (ZeroGPU moves tensors that way).
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F

from .qlinear import QuantizedLinear

from . import kernels

CUDA_INNER_K_TILES = 8
# fp32 activations make the CPU int4 kernel slow for many rows (it is tuned for bf16);
# above this many rows an fp32 forward dequantizes instead (see bench/linear_kernels.py).
FP32_KERNEL_MAX_ROWS = 4
# up to this many rows grace's int4 GEMV beats dequantize + bf16 GEMM (bench/linear_kernels.py: crossovers in the quiet rows of the sweep)
KERNEL_MAX_ROWS = 16
_REPACK_LOCK = threading.Lock()


def _nibbles_to_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k/2] (low nibble = even column) -> uint8 [n, k]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _codes_to_nibbles(codes: torch.Tensor) -> torch.Tensor:
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


@functools.lru_cache(maxsize=8)
def _cpu_layout_permutation(n: int, k: int) -> torch.Tensor:
    """Where the CPU kernel layout puts each weight: nibble j of the packed tensor holds
    element perm[j] of the row-major [n, k] codes. Found by packing the element
    indices themselves, four bits at a time, so it follows whatever torch does."""
    index = torch.arange(n * k, dtype=torch.int64)
    perm = torch.zeros(n * k, dtype=torch.int64)
    for digit in range(math.ceil(math.log2(max(n * k, 2)) / 4)):
        probe = ((index >> (4 * digit)) & 0xF).to(torch.int32).reshape(n, k)
        packed = torch._convert_weight_to_int4pack_for_cpu(probe, 2)
        perm |= _nibbles_to_codes(packed).reshape(-1).to(torch.int64) << (4 * digit)
    return perm


def layout_for(device: torch.device, n: int, k: int, group_size: int, dtype: torch.dtype) -> str:
    """The storage layout of an [n, k] weight whose tensors live on `device`."""
    if device.type == "cuda" and n % 8 == 0 and k % (CUDA_INNER_K_TILES * 16) == 0:
        return "cuda"
    if (device.type == "cpu" and dtype == torch.bfloat16 and group_size % 128 == 0 and kernels.worth_it(n, k)
            and kernels.available()):
        return "plain"                                          # grace's CPU kernels read nibbles as they are
    if device.type == "cpu" and n % 16 == 0 and k % 2 == 0:
        return "cpu"
    return "plain"


def _pack(layout: str, codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [n, k] -> the packed weight in `layout`, on the codes' device."""
    if layout == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    if layout == "cuda":
        codes = codes.to(torch.uint8)
        high_first = (codes[:, 0::2] << 4) | codes[:, 1::2]   # the CUDA packer wants the even column high
        return torch._convert_weight_to_int4pack(high_first, CUDA_INNER_K_TILES)
    return _codes_to_nibbles(codes)


class Int4Linear(QuantizedLinear):
    """A linear layer whose weight is 4-bit codes with group-wise scale and zero."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, group_size, dtype, device)
        device = torch.device(device or "cpu")
        codes = torch.full((out_features, in_features), 8, dtype=torch.uint8, device=device)
        self.layout = layout_for(device, out_features, in_features, group_size, dtype)
        self._packed_for = (device, dtype)
        self.register_buffer("weight_packed", _pack(self.layout, codes))
        self.register_buffer("scales_and_zeros",
                             torch.zeros(in_features // group_size, out_features, 2, dtype=dtype, device=device))

    # -- construction -----------------------------------------------------------------------
    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> "Int4Linear":
        """codes [out, in] in [0, 15]; scales [out, in/group]; zeros [out, in/group] as integer
        zero points (W = (q - zero) * scale), default 8: a symmetric grid stored as q + 8.
        Computed in fp32, stored in the module's dtype."""
        self._check_codes(codes, 0, 15, scales=scales, zeros=zeros)
        device = self.scales_and_zeros.device
        scales = scales.to(device, torch.float32)
        offset = (8 - zeros.to(device, torch.float32)) * scales if zeros is not None else torch.zeros_like(scales)
        self.scales_and_zeros = torch.stack((scales, offset), dim=-1).transpose(0, 1).contiguous().to(self.scales_and_zeros.dtype)
        self._pack_codes(codes.to(device))
        return self

    def _pack_codes(self, codes: torch.Tensor) -> None:
        """Store codes (on the device they should live on) in that device's layout."""
        layout = layout_for(codes.device, self.out_features, self.in_features, self.group_size, self.scales_and_zeros.dtype)
        packed = _pack(layout, codes)
        self.weight_packed, self.layout = packed, layout
        self._packed_for = (codes.device, self.scales_and_zeros.dtype)   # device and dtype the layout was chosen for

    # -- reading back ---------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The 4-bit codes as uint8 [out, in], whatever the storage layout."""
        n, k = self.out_features, self.in_features
        if self.layout == "plain":
            return _nibbles_to_codes(self.weight_packed)
        if self.layout == "cpu":
            flat = torch.empty(n * k, dtype=torch.uint8)
            flat[_cpu_layout_permutation(n, k)] = _nibbles_to_codes(self.weight_packed.cpu()).reshape(-1)
            return flat.reshape(n, k).to(self.weight_packed.device)
        # CUDA tinygemm layout: run the kernel on the identity with unit scales and no offset
        # (on a GPU even if the tensor was moved off one behind the module's back).
        packed = self.weight_packed if self.weight_packed.is_cuda else self.weight_packed.to("cuda")
        eye = torch.eye(k, dtype=torch.bfloat16, device=packed.device)
        unit = torch.zeros(k // self.group_size, n, 2, dtype=torch.bfloat16, device=eye.device)
        unit[..., 0] = 1
        q = torch._weight_int4pack_mm(eye, packed, self.group_size, unit)
        return (q.t().float().round() + 8).to(torch.uint8).to(self.weight_packed.device)

    def dequantize(self) -> torch.Tensor:
        """Reference weight [out, in] in the module's dtype (computed in fp32)."""
        sz = self.scales_and_zeros.float()
        scale = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)
        offset = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        w = (self.codes().to(sz.device).float() - 8) * scale + offset
        return w.to(self.scales_and_zeros.dtype)

    # -- compute ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sz, packed, gs = self.scales_and_zeros, self.weight_packed, self.group_size
        if (packed.device, sz.dtype) != self._packed_for:      # tensors moved behind our back (ZeroGPU)
            self._repack_if_moved()
            sz, packed = self.scales_and_zeros, self.weight_packed
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(sz.dtype)
        rows = x2.shape[0]
        if (self.layout == "plain" and sz.dtype == torch.bfloat16 and gs % 128 == 0
                and kernels.worth_it(self.out_features, self.in_features) and kernels.usable(x2, packed)):
            if rows <= KERNEL_MAX_ROWS:
                y = kernels.linear_int4(x2, packed, sz, gs)
            else:
                y = kernels.dequantized_linear(x2, lambda start, n, out: kernels.dequant_int4(packed, sz, gs, start, n, out),
                                               self.out_features, self.in_features)
        elif self.layout == "cpu" and (sz.dtype != torch.float32 or rows <= FP32_KERNEL_MAX_ROWS):
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, gs, sz)
        elif self.layout == "cuda":
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), packed, gs, sz.to(torch.bfloat16))
        else:
            y = F.linear(x2, self.dequantize())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _repack_if_moved(self) -> None:
        """The bytes are in the layout of the device (and dtype) they were packed for, `_packed_for`; once
        their tensors sit elsewhere, decode them in that layout and repack for where they are, once."""
        with _REPACK_LOCK:                                     # one thread repacks, the others see the result
            here = (self.weight_packed.device, self.scales_and_zeros.dtype)
            if here == self._packed_for:
                return
            wanted = layout_for(here[0], self.out_features, self.in_features, self.group_size, here[1])
            if wanted != self.layout:
                self._pack_codes(self.codes())
            self._packed_for = here

    # -- device moves repack for the new device's kernel --------------------------------------------
    def _apply(self, fn, recurse=True):
        before = self.weight_packed.device
        after = fn(torch.empty(0, device=before)).device
        if after == before:
            return super()._apply(fn, recurse)
        codes = self.codes()
        super()._apply(fn, recurse)
        self._pack_codes(codes.to(after))
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout}"
