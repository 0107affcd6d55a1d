"""GPTQ on-disk packing (AutoGPTQ / AutoRound "auto_gptq" exports): eight 4-bit codes per int32.

For a linear with in_features K and out_features N (see the README's layout table):
    qweight int32 [K/8, N]         codes along the INPUT dim: bits 4j..4j+3 of qweight[r, n] = code of row 8r+j
    qzeros  int32 [K/g, N/8]       zero points along the OUTPUT dim: bits 4j..4j+3 of qzeros[g, c] = column 8c+j
    scales  fp16  [K/g, N]         signed (AutoRound picks the sign), so never abs() or log() them
    g_idx   int32 [K]              group of each input row (optional)
    W[n, i] = scales[g(i), n] * (q[i, n] - zero[g(i), n])
GPTQ "v1" (every AutoGPTQ / AutoRound export) stores zero - 1; gptqmodel's "gptq_v2" stores the zero itself.
Nibbles are sequential (LSB first), unlike AWQ's interleaved order.
"""

from __future__ import annotations

import torch

from ..errors import GraceLoadError

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _unpack_last(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., m] -> uint8 [..., m, 8]: nibble j of each word (LSB first)."""
    return ((packed.to(torch.int32).unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF).to(torch.uint8)


def _pack_last(codes: torch.Tensor) -> torch.Tensor:
    """int codes [..., m, 8] in [0, 15] -> int32 [..., m] (nibble 7 lands in the sign bit, as GPTQ writes it)."""
    shifted = codes.to(torch.int32) << _SHIFTS.to(codes.device)
    packed = shifted[..., 0].clone()
    for j in range(1, 8):
        packed |= shifted[..., j]
    return packed


def unpack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K/8, N] -> codes uint8 [K, N]."""
    rows, n = qweight.shape
    return _unpack_last(qweight.t()).reshape(n, rows * 8).t()


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """codes [K, N] in [0, 15] -> qweight int32 [K/8, N]."""
    k, n = codes.shape
    _check_codes(codes, k, "rows")
    return _pack_last(codes.t().reshape(n, k // 8, 8)).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor) -> torch.Tensor:
    """qzeros int32 [G, N/8] -> stored zeros uint8 [G, N]."""
    groups, blocks = qzeros.shape
    return _unpack_last(qzeros).reshape(groups, blocks * 8)


def pack_qzeros(zeros: torch.Tensor) -> torch.Tensor:
    """stored zeros [G, N] in [0, 15] -> qzeros int32 [G, N/8]."""
    groups, n = zeros.shape
    _check_codes(zeros, n, "columns")
    return _pack_last(zeros.reshape(groups, n // 8, 8))


def _check_codes(codes: torch.Tensor, length: int, what: str) -> None:
    if length % 8:
        raise ValueError(f"GPTQ packing needs a multiple of 8 {what}, got {length}")
    if codes.numel() and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("GPTQ codes must lie in [0, 15]")


def decode(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
           g_idx: torch.Tensor | None = None, zero_offset: int = 1, name: str = "linear"):
    """The GPTQ tensors of one linear -> (codes uint8 [N, K], scales fp32 [N, K/g'], zeros fp32 [N, K/g'], g'):
    the real zero points, ready for `Int4Linear(group_size=g').set_codes`. group_size -1 (one group per row) is spread
    over groups of 128 when K allows. Raises GraceLoadError for a `g_idx` that is not contiguous groups
    (act-order): Int4Linear's kernels need each group to be a run of consecutive input columns."""
    k = qweight.shape[0] * 8
    n = qweight.shape[1]
    n_groups = scales.shape[0]
    if group_size in (-1, 0):
        group_size = k
    if k % group_size or n_groups != k // group_size or tuple(scales.shape) != (n_groups, n) \
            or tuple(qzeros.shape) != (n_groups, n // 8):
        raise GraceLoadError(f"'{name}': GPTQ tensors do not fit together (qweight {tuple(qweight.shape)}, "
                             f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}, group size {group_size})")
    if g_idx is not None:
        trivial = torch.arange(k, device=g_idx.device) // group_size
        if g_idx.numel() != k or not torch.equal(g_idx.long(), trivial):
            raise GraceLoadError(f"'{name}' uses act-order (desc_act): its g_idx puts input rows in non-contiguous "
                                 "groups, which grace's INT4 kernels cannot run. Re-export the model without "
                                 "desc_act (AutoRound and GPTQ both offer that).")
    codes = unpack_qweight(qweight).t().contiguous()                          # [N, K]
    zeros = unpack_qzeros(qzeros).float() + zero_offset                       # [G, N], real zero points
    scale = scales.float()
    if group_size == k and k > 128 and k % 128 == 0:                           # per-channel -> equal groups of 128
        reps = k // 128
        zeros, scale, group_size = zeros.repeat_interleave(reps, 0), scale.repeat_interleave(reps, 0), 128
    return codes, scale.t().contiguous(), zeros.t().contiguous(), group_size


def dequantize(qweight, qzeros, scales, group_size: int, g_idx=None, zero_offset: int = 1) -> torch.Tensor:
    """Reference decode: weight [N, K] in fp32, using g_idx row by row when given (act-order included)."""
    codes = unpack_qweight(qweight).float()                                   # [K, N]
    k = codes.shape[0]
    if g_idx is None:
        g_idx = torch.arange(k) // (k if group_size in (-1, 0) else group_size)
    g_idx = g_idx.long()
    zeros = unpack_qzeros(qzeros).float() + zero_offset
    return ((codes - zeros[g_idx]) * scales.float()[g_idx]).t().contiguous()
