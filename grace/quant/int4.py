"""4-bit weight-only linear on torch's tinygemm int4 kernels.

The weight is held as 4-bit codes q in [0, 15] with a scale s and a float zero
offset z per group of `group_size` input columns, in tinygemm's convention:

    W[o, i] = (q[o, i] - 8) * s[o, g] + z[o, g],   g = i // group_size

An AWQ/integer zero point zp maps onto it exactly as z = (8 - zp) * s.

Storage follows the device: on CPU the layout of `_convert_weight_to_int4pack_for_cpu`
(run by `_weight_int4pack_mm_for_cpu`), on CUDA the layout of `_convert_weight_to_int4pack`
(run by `_weight_int4pack_mm`), and for shapes those kernels reject a plain nibble layout
run through `dequantize()`, which is also the reference every kernel is tested against.
All three hold half a byte per weight.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .qlinear import QuantizedLinear

CUDA_INNER_K_TILES = 8
# fp32 activations make the CPU int4 kernel slow for many rows (it is tuned for bf16);
# above this many rows an fp32 forward dequantizes instead (see bench/linear_kernels.py).
FP32_KERNEL_MAX_ROWS = 4


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


def _pack_for(device: torch.device, codes: torch.Tensor) -> tuple[torch.Tensor, str]:
    """codes uint8 [n, k] -> (packed weight, layout name) for `device`."""
    n, k = codes.shape
    if device.type == "cpu" and n % 16 == 0 and k % 2 == 0:
        return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2), "cpu"
    if device.type == "cuda" and n % 8 == 0 and k % (CUDA_INNER_K_TILES * 16) == 0:
        codes = codes.to(torch.uint8)
        high_first = (codes[:, 0::2] << 4) | codes[:, 1::2]   # the CUDA packer wants the even column high
        return torch._convert_weight_to_int4pack(high_first, CUDA_INNER_K_TILES), "cuda"
    return _codes_to_nibbles(codes), "plain"


class Int4Linear(QuantizedLinear):
    """A linear layer whose weight is 4-bit codes with group-wise scale and zero."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, group_size, dtype, device)
        device = torch.device(device or "cpu")
        codes = torch.full((out_features, in_features), 8, dtype=torch.uint8, device=device)
        packed, self.layout = _pack_for(device, codes)
        self.register_buffer("weight_packed", packed)
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
        self.weight_packed, self.layout = _pack_for(device, codes.to(device))
        return self

    # -- reading back ---------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The 4-bit codes as uint8 [out, in], whatever the storage layout."""
        n, k = self.out_features, self.in_features
        if self.layout == "plain":
            return _nibbles_to_codes(self.weight_packed)
        if self.layout == "cpu":
            flat = torch.empty(n * k, dtype=torch.uint8)
            flat[_cpu_layout_permutation(n, k)] = _nibbles_to_codes(self.weight_packed).reshape(-1)
            return flat.reshape(n, k)
        # CUDA tinygemm layout: run the kernel on the identity with unit scales and no offset.
        eye = torch.eye(k, dtype=torch.bfloat16, device=self.weight_packed.device)
        unit = torch.zeros(k // self.group_size, n, 2, dtype=torch.bfloat16, device=eye.device)
        unit[..., 0] = 1
        q = torch._weight_int4pack_mm(eye, self.weight_packed, self.group_size, unit)
        return (q.t().float().round() + 8).to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        """Reference weight [out, in] in the module's dtype (computed in fp32)."""
        sz = self.scales_and_zeros.float()
        scale = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)
        offset = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        w = (self.codes().to(sz.device).float() - 8) * scale + offset
        return w.to(self.scales_and_zeros.dtype)

    # -- compute ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        sz = self.scales_and_zeros
        if self.layout == "cpu" and (sz.dtype != torch.float32 or x2.shape[0] <= FP32_KERNEL_MAX_ROWS):
            y = torch._weight_int4pack_mm_for_cpu(x2.to(sz.dtype).contiguous(), self.weight_packed, self.group_size, sz)
        elif self.layout == "cuda":
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight_packed, self.group_size,
                                          sz.to(torch.bfloat16))
        else:
            y = F.linear(x2.to(sz.dtype), self.dequantize())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    # -- device moves repack for the new device's kernel --------------------------------------------
    def _apply(self, fn, recurse=True):
        before = self.weight_packed.device
        after = fn(torch.empty(0, device=before)).device
        if after == before:
            return super()._apply(fn, recurse)
        codes = self.codes()
        super()._apply(fn, recurse)
        self.weight_packed, self.layout = _pack_for(after, codes.to(after))
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout}"
