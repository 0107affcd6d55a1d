"""4-bit weight-only linear on torch's tinygemm int4 kernels.

The weight is held as 4-bit codes q in [0, 15] with a scale s and a float zero
offset z per group of `group_size` input columns, in tinygemm's convention:

    W[o, i] = (q[o, i] - 8) * s[o, g] + z[o, g],   g = i // group_size

An AWQ/integer zero point zp maps onto it exactly as z = (8 - zp) * s.

Storage follows the device and dtype (`layout_for`): on CUDA the layout of `_convert_weight_to_int4pack`
(run by `_weight_int4pack_mm`); on CPU, for bf16 modules where grace's own kernels run (quant/kernels.py),
"tiled": codes [out/8, in/128, 8, 64 bytes] (two per byte, low nibble = even column) and scales/zeros
[out/8, in/group, 8, 2], so the weights of 8 output rows are one contiguous stream (a GEMV for a few rows, a
pair GEMM for more, or the AMX GEMM on a CPU with AMX, dequantize + bf16 GEMM above `KERNEL_MAX_ROWS`:
quant/kernels.py); otherwise on CPU the layout of
`_convert_weight_to_int4pack_for_cpu` (run by `_weight_int4pack_mm_for_cpu`); shapes no kernel takes keep
the "plain" layout (codes [out, in/2], scales/zeros [in/group, out, 2]) and run through `dequantize()`,
which is also the reference every kernel is tested against. All hold half a byte per weight.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .qlinear import QuantizedLinear

from . import kernels

CUDA_INNER_K_TILES = 8
TILE = 8
# fp32 activations make the CPU int4 kernel slow for many rows (it is tuned for bf16);
# above this many rows an fp32 forward dequantizes instead (see bench/linear_kernels.py).
FP32_KERNEL_MAX_ROWS = 4
# up to this many rows grace's kernels (kernels.py: the GEMV, then the pair GEMM) beat dequantize + the bf16 GEMM
# (2B shapes, cold weights, bench/linear_kernels.py at d60b679: at 256 rows the pair GEMM is 5-8 % ahead on three
# of four shapes and level (1 % behind) on the fourth, for INT4 6144->2048 and INT8 2048->1024; earlier runs:
# level at 512 rows and 1-10 % behind at 1024, where oneDNN's blocking amortizes the dequantizing better). On AMX
# (linear_kernels_amx.json at 529a067) the AMX GEMM leads dequantize + oneDNN by 15-39 % at 256 rows; at 1024 rows
# (a scratch run, not in bench/) it was 0.81-0.99x the bf16 GEMM alone; the same limit until a run says otherwise
KERNEL_MAX_ROWS = 256
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
    """The storage layout of an [n, k] weight whose tensors live on `device` with scales in `dtype`."""
    if device.type == "cuda" and n % 8 == 0 and k % (CUDA_INNER_K_TILES * 16) == 0:
        return "cuda"
    if (device.type == "cpu" and dtype == torch.bfloat16 and group_size % 128 == 0 and n % TILE == 0
            and kernels.worth_it(n, k) and kernels.available()):
        return "tiled"                                          # grace's CPU kernels
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
    nibbles = _codes_to_nibbles(codes)
    if layout == "tiled":
        n, k = codes.shape
        return nibbles.reshape(n // TILE, TILE, k // 128, 64).transpose(1, 2).contiguous()
    return nibbles


class Int4Linear(QuantizedLinear):
    """A linear layer whose weight is 4-bit codes with group-wise scale and zero."""

    bits = 4
    _decode_kernel = ("int4", "weight_packed", "scales_and_zeros")      # decode_gemv: kind, codes and params buffers

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, group_size, dtype, device)
        device = torch.device(device or "cpu")
        self.register_buffer("weight_packed", torch.zeros(0, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(0, dtype=dtype, device=device))
        self._store(torch.full((out_features, in_features), 8, dtype=torch.uint8, device=device),
                    torch.zeros(in_features // group_size, out_features, 2, dtype=dtype, device=device))

    # -- layouts ----------------------------------------------------------------------------------
    def layout_for(self, device: torch.device, dtype: torch.dtype) -> str:
        return layout_for(device, self.out_features, self.in_features, self.group_size, dtype)

    def _hold(self, layout: str, codes: torch.Tensor, params: torch.Tensor) -> None:
        """codes uint8 [out, in] in [0, 15], params = scales_and_zeros [in/group, out, 2]."""
        self.weight_packed = _pack(layout, codes)
        if layout == "tiled":
            g, n = params.shape[:2]
            params = params.reshape(g, n // TILE, TILE, 2).transpose(0, 1)
        self.scales_and_zeros = params.contiguous()

    def _plain(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes(), self.scales_zeros()

    def _tensors_now(self) -> tuple:
        return self.weight_packed.device, self.scales_and_zeros.dtype

    # -- construction -----------------------------------------------------------------------
    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                  device: torch.device | str | None = None) -> "Int4Linear":
        """codes [out, in] in [0, 15]; scales [out, in/group]; zeros [out, in/group] as integer
        zero points (W = (q - zero) * scale), default 8: a symmetric grid stored as q + 8.
        Computed in fp32, stored in the module's dtype, on `device` (default: where the module is)."""
        self._check_codes(codes, 0, 15, scales=scales, zeros=zeros)
        device = self.weight_packed.device if device is None else torch.device(device)
        scales = scales.to(device, torch.float32)
        offset = (8 - zeros.to(device, torch.float32)) * scales if zeros is not None else torch.zeros_like(scales)
        params = torch.stack((scales, offset), dim=-1).transpose(0, 1).to(self.scales_and_zeros.dtype)
        self._store(codes.to(device, torch.uint8), params)
        return self

    # -- reading back ---------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The 4-bit codes as uint8 [out, in], whatever the storage layout."""
        n, k = self.out_features, self.in_features
        if self.layout == "plain":
            return _nibbles_to_codes(self.weight_packed)
        if self.layout == "tiled":
            return _nibbles_to_codes(self.weight_packed.transpose(1, 2).reshape(n, k // 2))
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

    def scales_zeros(self) -> torch.Tensor:
        """Scales and float zero offsets [in/group, out, 2] in the module's dtype, whatever the layout."""
        sz = self.scales_and_zeros
        if self.layout == "tiled":
            return sz.transpose(0, 1).reshape(self.groups, self.out_features, 2)
        return sz

    def dequantize(self) -> torch.Tensor:
        """Reference weight [out, in] in the module's dtype (computed in fp32)."""
        sz = self.scales_zeros().float()
        scale = sz[..., 0].t().repeat_interleave(self.group_size, dim=1)
        offset = sz[..., 1].t().repeat_interleave(self.group_size, dim=1)
        w = (self.codes().to(sz.device).float() - 8) * scale + offset
        return w.to(self.scales_and_zeros.dtype)

    # -- compute ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step's path first, with as little Python as possible
        buffers = self._buffers                        # not Module.__getattr__: ~0.5 us a lookup
        packed, sz = buffers["weight_packed"], buffers["scales_and_zeros"]
        if self._bf16_kernel_takes(x, packed, sz, KERNEL_MAX_ROWS):
            return kernels.linear_int4(x, packed, sz, self.group_size, self.out_features, torch.bfloat16)
        self._restore_if_moved()
        sz, packed, gs = self.scales_and_zeros, self.weight_packed, self.group_size
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(sz.dtype)
        rows = x2.shape[0]
        if self.layout == "tiled" and kernels.usable(x2):
            n = self.out_features
            if rows <= KERNEL_MAX_ROWS:
                y = kernels.linear_int4(x2, packed, sz, gs, n)
            else:
                y = kernels.dequantized_linear(x2, lambda start, r, out: kernels.dequant_int4(packed, sz, gs, n, start, r, out),
                                               n, self.in_features)
        elif self.layout == "cpu" and (sz.dtype != torch.float32 or rows <= FP32_KERNEL_MAX_ROWS):
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, gs, sz)
        elif self.layout == "cuda":
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), packed, gs, sz.to(torch.bfloat16))
        else:
            y = kernels.bf16_linear(x2, self.dequantize())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout}"
