"""LLaVA-1.5 (the GRACE LLaVA-1.5-7B releases, original LLaVA naming) on transformers' own Llava classes."""

from .config import IMAGE_TOKEN, is_llava_hf, is_original_llava, llava_config
from .load import is_llava, load_llava
from .processor import VICUNA_V1_SYSTEM, VICUNA_V1_TEMPLATE, build_processor
from .vision_tower import ENV_VAR as VISION_TOWER_ENV

__all__ = ["IMAGE_TOKEN", "VICUNA_V1_SYSTEM", "VICUNA_V1_TEMPLATE", "VISION_TOWER_ENV", "build_processor",
           "is_llava", "is_llava_hf", "is_original_llava", "llava_config", "load_llava"]
