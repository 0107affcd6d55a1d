"""Low-bit linear layers and the AWQ GEMM on-disk packing."""

from .int4 import Int4Linear
from .int8 import Int8Linear

__all__ = ["Int4Linear", "Int8Linear"]
