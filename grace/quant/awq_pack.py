"""AWQ GEMM packing: eight 4-bit codes per int32, in AutoAWQ's interleaved order.

On disk (AutoAWQ `WQLinear_GEMM`, version "gemm"):
    qweight int32 [in, out/8]      codes, packed along the output dimension
    qzeros  int32 [in/group, out/8] zero points, packed the same way
    scales  fp16  [in/group, out]
    weight[o, i] = (code[i, o] - zero[i // group, o]) * scale[i // group, o]

Within each int32, nibble k (bits 4k..4k+3) holds output column AWQ_ORDER[k] of its
block of eight, AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7].
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int codes [rows, cols] with values in [0, 15] -> AWQ-packed int32 [rows, cols/8]."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 columns, got {cols}")
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("AWQ codes must lie in [0, 15]")
    blocks = codes.to(torch.int32).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    shifted = blocks << _SHIFTS.to(codes.device)
    packed = shifted[..., 0].clone()
    for k in range(1, 8):  # nibble 7 lands in the sign bit: int32 keeps the same bits AutoAWQ writes
        packed |= shifted[..., k]
    return packed


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 [rows, cols/8] -> codes uint8 [rows, cols] in natural column order."""
    rows, blocks = packed.shape
    nibbles = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # nibble k of each int32
    natural = torch.empty_like(nibbles)
    natural[..., list(AWQ_ORDER)] = nibbles
    return natural.reshape(rows, blocks * 8).to(torch.uint8)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reference decode of an AWQ GEMM linear: weight [out, in] in fp32."""
    codes = unpack(qweight).float()                       # [in, out]
    zeros = unpack(qzeros).float()                        # [in/group, out]
    scale = scales.float()
    w = (codes - zeros.repeat_interleave(group_size, 0)) * scale.repeat_interleave(group_size, 0)
    return w.t().contiguous()
