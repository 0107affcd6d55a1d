"""8-bit group-wise weight-only linear.

    W[o, i] = q[o, i] * s[o, i // group_size],   q in [-128, 127]  (symmetric, no zero point)

Codes are held group-major, [in/group, out, group] int8, so each group is a contiguous
[out, group] matrix. On CPU with bf16 activations grace's own kernels (quant/kernels.py) run: a
GEMV that streams the codes once and applies each group's scale in fp32, up to `KERNEL_MAX_ROWS`
rows, and above that a dequantize (bit-identical to `dequantize()`) into a reused bf16 buffer
followed by the bf16 GEMM. Without them torch's `_weight_int8pack_mm` (a per-row-scale int8 GEMV)
runs once per group with the partial sums accumulated in fp32, up to `TORCH_LOOP_MAX_ROWS`
(`FP32_KERNEL_MAX_ROWS` for fp32), and the dequantized matmul above. Thresholds: bench/linear_kernels.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .qlinear import QuantizedLinear

from . import kernels

# grace's int8 GEMV beats dequantize + bf16 GEMM up to this many rows (bench/linear_kernels.py: crossovers in the quiet rows of the sweep)
KERNEL_MAX_ROWS = 8
# without grace's kernels: up to this many rows the per-group torch int8 loop beats dequantize + matmul
# (bench/linear_kernels.py: with bf16 activations up to 16 rows on every 2B shape, with fp32 up to 2-8)
TORCH_LOOP_MAX_ROWS = 16
FP32_KERNEL_MAX_ROWS = 4


class Int8Linear(QuantizedLinear):
    bits = 8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, group_size, dtype, device)
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(groups, out_features, group_size, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))

    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> "Int8Linear":
        """codes int [out, in] in [-128, 127]; scales [out, in/group]. Symmetric: no zero points."""
        if zeros is not None:
            raise ValueError("Int8Linear is symmetric (W = q * s): it takes no zero points")
        self._check_codes(codes, -128, 127, scales=scales)
        groups = self.groups
        device = self.qweight.device
        self.qweight = codes.to(device, torch.int8).reshape(self.out_features, groups, self.group_size).transpose(0, 1).contiguous()
        self.scales = scales.to(device, torch.float32).t().contiguous().to(self.scales.dtype)
        return self

    def codes(self) -> torch.Tensor:
        """int8 [out, in]."""
        return self.qweight.transpose(0, 1).reshape(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in the scales' dtype. Codes are exact in bf16/fp16, so one rounding of q*s, as in fp32."""
        w = self.qweight.to(self.scales.dtype) * self.scales.unsqueeze(-1)    # [groups, out, group]
        return w.transpose(0, 1).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        q, s, gs, rows = self.qweight, self.scales, self.group_size, x2.shape[0]
        if (s.dtype == torch.bfloat16 and gs % 64 == 0 and kernels.worth_it(self.out_features, self.in_features)
                and kernels.usable(x2, q)):
            if rows <= KERNEL_MAX_ROWS:
                y = kernels.linear_int8(x2, q, s, gs)
            else:
                y = kernels.dequantized_linear(x2, lambda start, n, out: kernels.dequant_int8(q, s, gs, start, n, out),
                                               self.out_features, self.in_features)
        elif x2.device.type == "cpu" and rows <= (FP32_KERNEL_MAX_ROWS if x2.dtype == torch.float32 else TORCH_LOOP_MAX_ROWS):
            xg = x2.reshape(-1, q.shape[0], gs).transpose(0, 1).contiguous()
            y = torch._weight_int8pack_mm(xg[0], q[0], s[0]).float()
            for g in range(1, q.shape[0]):
                y += torch._weight_int8pack_mm(xg[g], q[g], s[g])
        else:
            y = F.linear(x2, self.dequantize())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)
