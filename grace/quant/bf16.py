"""BF16 linears that decode at the memory wall on CPU.

torch's bf16 `F.linear` with a few rows goes through oneDNN, which moves weights at well under half
the machine's read bandwidth (bench/linear_kernels.py). Switching oneDNN off helps only at M = 1 and
is a process-wide flag, which threads serving several models at once (the app's Compare tab) would
flip under each other. `FastBF16Linear` instead calls grace's bf16 GEMV (quant/kernels.py) up to
`kernel_max_rows()` rows and `F.linear` otherwise: no global state, the same weights, fp32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

# up to this many rows grace's bf16 GEMV beats oneDNN's GEMM (bench/linear_kernels.py: crossovers in the quiet rows of the sweep)
KERNEL_MAX_ROWS = 16
# ... where oneDNN runs on AMX (a 2-core AMX guest, a scratch run of the kernels with cold weights, not in bench/: the
# GEMV 2-10 % ahead at 5 rows, 0-9 % behind at 6; linear_kernels_amx.json: ahead at 4, behind at 8)
AMX_KERNEL_MAX_ROWS = 5


# ... and on the AVX2 build, where torch's bf16 GEMM is slow at every row count (a 2-core AMD Zen 3: the GEMV at 16 rows
# 3.5x ahead of it on the 2B shapes, and 2.9x ahead of the same product in fp32 on 2048 x 2048)
AVX2_KERNEL_MAX_ROWS = 32


def kernel_max_rows() -> int:
    """Up to how many rows FastBF16Linear takes grace's GEMV on this machine (read at each call)."""
    if kernels.amx():
        return AMX_KERNEL_MAX_ROWS
    return AVX2_KERNEL_MAX_ROWS if kernels.isa() == "avx2" else KERNEL_MAX_ROWS


class FastBF16Linear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose few-row CPU bf16 forward uses grace's GEMV."""

    def _kernel_takes(self, x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
        return (x.dtype is torch.bfloat16 and w.dtype is torch.bfloat16 and x.shape[-1] == self.in_features
                and x.numel() <= rows * self.in_features and self.in_features % 32 == 0
                and x.is_cpu and w.is_cpu and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
                and kernels.worth_it(self.out_features, self.in_features) and kernels.available())

    def decode_gemv(self, x: torch.Tensor) -> tuple | None:
        """("bf16", weight, None, out_features, 0) when this forward of one row `x` is one call of grace's GEMV
        over whole 8-row tiles (kernels.gemv_many can then take it with its siblings), else None."""
        w = self._parameters["weight"]
        if (self._parameters["bias"] is None and self.out_features % 8 == 0 and x.numel() == self.in_features
                and self._kernel_takes(x, w, 1)):
            return "bf16", w.contiguous(), None, self.out_features, 0
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = self._parameters["weight"], self._parameters["bias"]   # not Module.__getattr__: ~0.5 us each
        if self._kernel_takes(x, w, kernel_max_rows()):
            if bias is None:                            # bf16 straight from the kernel: the same rounding as .to()
                return kernels.linear_bf16(x, w, torch.bfloat16)
            return (kernels.linear_bf16(x, w) + bias.float()).to(x.dtype)
        if not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) and w.dtype is torch.bfloat16:
            return kernels.bf16_linear(x, w, bias)          # fp32 where torch's bf16 GEMM is slow
        return F.linear(x, w, bias)


def fast_bf16_linears_(model: nn.Module) -> list[str]:
    """Turn every plain nn.Linear of `model` into a FastBF16Linear, in place (the class changes; the
    parameters, their tying and any hooks stay). Returns the names. A no-op where the kernels cannot
    run (their forward falls back to F.linear)."""
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = FastBF16Linear
            names.append(name)
    return names
