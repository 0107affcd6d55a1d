"""Low-bit linear layers, the quantization primitives they share, `quantize_` and the AWQ GEMM packing."""

from .int4 import Int4Linear
from .int8 import Int8Linear
from .qlinear import QuantizedLinear
from .quantize import (DEFAULT_SKIP, Int4WeightOnlyConfig, Int8WeightOnlyConfig, name_matches, quantize_,
                       register_handler, target_linears)

__all__ = ["DEFAULT_SKIP", "Int4Linear", "Int8Linear", "QuantizedLinear", "Int4WeightOnlyConfig",
           "Int8WeightOnlyConfig", "name_matches", "quantize_", "register_handler", "target_linears"]
