"""GRACE: Gated Relational Alignment via Confidence-based Distillation, for Qwen3-VL."""

from .errors import GraceLoadError
from .load import LoadedModel, load

__all__ = ["GraceLoadError", "LoadedModel", "load"]
__version__ = "0.1.0"
