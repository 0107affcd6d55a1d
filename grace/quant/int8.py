"""8-bit group-wise weight-only linear.

    W[o, i] = q[o, i] * s[o, i // group_size],   q in [-128, 127]  (symmetric, no zero point)

Two storage layouts, chosen for the device and dtype the tensors live on:

- "tiled" (CPU, bf16, where grace's kernels run, quant/kernels.py): codes [out/8, in/group, 8, group] and
  scales [out/8, in/group, 8], so the weights of 8 output rows are one contiguous stream. For a few rows a
  GEMV reads each byte once and applies each group's scale in fp32; for more, up to `KERNEL_MAX_ROWS`, a
  tile GEMM (each 8-row tile dequantized once into L1) and then a pair GEMM (32 rows at a time dequantized
  into the bf16 dot product's layout, at its peak) meet every row with them, or on a CPU with AMX the AMX
  GEMM (the same dequantized weights, met by the tile unit); above, a dequantize (bit-identical to
  `dequantize()`) into a reused bf16 buffer and the bf16 GEMM.
- "groups" (anywhere else): codes [in/group, out, group], scales [in/group, out], so each group is a
  contiguous [out, group] matrix: torch's `_weight_int8pack_mm` (a per-row-scale int8 GEMV) runs once per
  group with the partial sums accumulated in fp32, up to `TORCH_LOOP_MAX_ROWS` (`FP32_KERNEL_MAX_ROWS` for
  fp32) rows, and the dequantized matmul above. Thresholds: bench/linear_kernels.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .qlinear import QuantizedLinear

from . import kernels

# up to this many rows grace's kernels (kernels.py: the GEMV, then the pair GEMM) beat dequantize + the bf16 GEMM
# (2B shapes, cold weights, bench/linear_kernels.py at d60b679: at 256 rows the pair GEMM is 5-8 % ahead on three
# of four shapes and level (1 % behind) on the fourth, for INT4 6144->2048 and INT8 2048->1024; earlier runs:
# level at 512 rows and 1-10 % behind at 1024, where oneDNN's blocking amortizes the dequantizing better). On AMX
# (linear_kernels_amx.json at 529a067) the AMX GEMM leads dequantize + oneDNN by 15-39 % at 256 rows; at 1024 rows
# (a scratch run, not in bench/) it was 0.81-0.99x the bf16 GEMM alone; the same limit until a run says otherwise
KERNEL_MAX_ROWS = 256
# without grace's kernels: up to this many rows the per-group torch int8 loop beats dequantize + matmul
# (bench/linear_kernels.py: with bf16 activations up to 16 rows on every 2B shape, with fp32 up to 2-8)
TORCH_LOOP_MAX_ROWS = 16
FP32_KERNEL_MAX_ROWS = 4
TILE = 8


class Int8Linear(QuantizedLinear):
    bits = 8
    _decode_kernel = ("int8", "qweight", "scales")      # decode_gemv: kind, codes and params buffers

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, group_size, dtype, device)
        device = torch.device(device or "cpu")
        self.register_buffer("qweight", torch.zeros(0, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(0, dtype=dtype, device=device))
        self._store(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                    torch.zeros(self.groups, out_features, dtype=dtype, device=device))

    # -- layouts ----------------------------------------------------------------------------------
    def layout_for(self, device: torch.device, dtype: torch.dtype) -> str:
        if (device.type == "cpu" and dtype == torch.bfloat16 and self.group_size % 64 == 0
                and self.out_features % TILE == 0 and kernels.worth_it(self.out_features, self.in_features)
                and kernels.available()):
            return "tiled"
        return "groups"

    def _hold(self, layout: str, codes: torch.Tensor, params: torch.Tensor) -> None:
        """codes int8 [out, in], params = scales [in/group, out]."""
        n, g, gs = self.out_features, self.groups, self.group_size
        grouped = codes.to(torch.int8).reshape(n, g, gs)
        if layout == "tiled":
            self.qweight = grouped.reshape(n // TILE, TILE, g, gs).transpose(1, 2).contiguous()
            self.scales = params.t().reshape(n // TILE, TILE, g).transpose(1, 2).contiguous()
        else:
            self.qweight = grouped.transpose(0, 1).contiguous()
            self.scales = params.contiguous()

    def _plain(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes(), self.group_scales()

    def _tensors_now(self) -> tuple:
        return self.qweight.device, self.scales.dtype

    # -- construction and reading back --------------------------------------------------------------
    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                  device: torch.device | str | None = None) -> "Int8Linear":
        """codes int [out, in] in [-128, 127]; scales [out, in/group]. Symmetric: no zero points. Held on
        `device` (default: where the module is)."""
        if zeros is not None:
            raise ValueError("Int8Linear is symmetric (W = q * s): it takes no zero points")
        self._check_codes(codes, -128, 127, scales=scales)
        device = self.qweight.device if device is None else torch.device(device)
        self._store(codes.to(device, torch.int8), scales.to(device, torch.float32).t().to(self.scales.dtype))
        return self

    def codes(self) -> torch.Tensor:
        """int8 [out, in]."""
        n, k = self.out_features, self.in_features
        if self.layout == "tiled":
            return self.qweight.transpose(1, 2).reshape(n, k)
        return self.qweight.transpose(0, 1).reshape(n, k)

    def group_scales(self) -> torch.Tensor:
        """[in/group, out] in the module's dtype."""
        if self.layout == "tiled":
            return self.scales.transpose(1, 2).reshape(self.out_features, self.groups).t()
        return self.scales

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in the scales' dtype. Codes are exact in bf16/fp16, so one rounding of q*s, as in fp32."""
        scales = self.group_scales().t().repeat_interleave(self.group_size, dim=1)
        return self.codes().to(scales.dtype) * scales

    # -- compute ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step's path first, with as little Python as possible
        buffers = self._buffers                        # not Module.__getattr__: ~0.5 us a lookup
        q, s = buffers["qweight"], buffers["scales"]
        if self._bf16_kernel_takes(x, q, s, KERNEL_MAX_ROWS):
            return kernels.linear_int8(x, q, s, self.group_size, self.out_features, torch.bfloat16)
        self._restore_if_moved()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        q, s, gs, rows = self.qweight, self.scales, self.group_size, x2.shape[0]
        if self.layout == "tiled" and kernels.usable(x2):
            if rows <= KERNEL_MAX_ROWS:
                y = kernels.linear_int8(x2, q, s, gs, self.out_features)
            else:
                y = kernels.dequantized_linear(
                    x2, lambda start, n, out: kernels.dequant_int8(q, s, gs, self.out_features, start, n, out),
                    self.out_features, self.in_features)
        elif (self.layout == "groups" and x2.device.type == "cpu"
              and rows <= (FP32_KERNEL_MAX_ROWS if x2.dtype == torch.float32 else TORCH_LOOP_MAX_ROWS)):
            xg = x2.reshape(-1, q.shape[0], gs).transpose(0, 1).contiguous()
            y = torch._weight_int8pack_mm(xg[0], q[0], s[0]).float()
            for g in range(1, q.shape[0]):
                y += torch._weight_int8pack_mm(xg[g], q[g], s[g])
        else:
            y = kernels.bf16_linear(x2, self.dequantize())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout}"
