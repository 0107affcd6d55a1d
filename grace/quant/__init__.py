"""Low-bit linear layers, round-to-nearest quantization and the AWQ GEMM on-disk packing."""

from .int4 import Int4Linear
from .int8 import Int8Linear
from .quantize import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

__all__ = ["Int4Linear", "Int8Linear", "Int4WeightOnlyConfig", "Int8WeightOnlyConfig", "quantize_"]
