"""GRACE: Gated Relational Alignment via Confidence-based Distillation, for Qwen3-VL and LLaVA-1.5.

    import grace
    grace.inspect("ForeverBlue/Qwen3-VL-2B-GRACE-W4G128-AWQ")            # format, kind, bits: no weights read
    loaded = grace.load("ForeverBlue/Qwen3-VL-2B-GRACE-W4G128-AWQ")      # any release format
    grace.export_awq("path/to/Qwen3-VL-2B-GRACE-W4G128", "out/awq")      # QAT W4 -> AWQ INT4
    grace.export_awq("path/to/Qwen3-VL-2B-GRACE-W4G128", "out/hf", layout="hf")   # for vLLM / SGLang
    grace.load("ForeverBlue/LLaVA-1.5-7B-GRACE-W4G128", vision_tower="path/to/clip-vit-large-patch14-336")
    grace.load("Vishva007/Qwen3-VL-2B-Instruct-W4A16-AutoRound-GPTQ")    # the AutoRound W4A16 rival
    grace.quantize_(model, grace.Int4WeightOnlyConfig())                   # round-to-nearest baseline
    grace.train(grace.TrainConfig(teacher=..., student=..., bits=4, steps=1000, out="runs/w4"))
    grace.evaluate(loaded, "shapes-test")
"""

from .errors import GraceLoadError
from .checkpoint_info import CheckpointInfo, inspect
from .export import export_awq, export_int8, save_packed, save_plain, save_qat_release
from .load import LoadedModel, load
from .quant import Int4Linear, Int4WeightOnlyConfig, Int8Linear, Int8WeightOnlyConfig, quantize_
from . import train   # the package, callable: grace.train(TrainConfig(...)) runs a training
from .train import TrainConfig, TrainResult
from .evaluation import EvalResult, evaluate
from .image_budget import ImageView, seen_as

__all__ = ["GraceLoadError", "CheckpointInfo", "inspect", "LoadedModel", "load", "export_awq", "export_int8",
           "save_packed", "save_plain", "save_qat_release", "quantize_", "Int4Linear", "Int8Linear",
           "Int4WeightOnlyConfig", "Int8WeightOnlyConfig", "TrainConfig", "TrainResult", "train", "EvalResult",
           "evaluate", "ImageView", "seen_as"]
__version__ = "0.1.0"
