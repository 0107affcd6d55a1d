"""Recognising which GRACE / transformers release layout a checkpoint folder uses.

See the README ("Checkpoint layouts") for each layout. Detection reads config.json and the
small JSON sidecars only; tensors are read by `grace.load`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import GraceLoadError

SUPPORTED_MODEL_TYPES = ("qwen3_vl",)
AWQ_MODULES_FILE = "awq_quantized_modules.json"
INT8_MODULES_FILE = "int8_quantized_modules.json"
QAT_SIDECAR = "qat_quantized_weights.bin"


@dataclass
class Layout:
    """What a checkpoint folder holds. `format` names the on-disk layout, `kind` what it means."""

    format: str                    # plain | grace-awq | hf-awq | grace-qat | grace-int8 | gptq | auto-round
    kind: str                      # bf16 | int8 | int4
    bits: int = 16
    group_size: int = 128
    modules: list[str] = field(default_factory=list)     # quantized linears named by the layout itself
    skip: list[str] = field(default_factory=list)        # name components never quantized (hf-awq, qat)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraceLoadError(f"{path.parent} has no {path.name}: not a transformers checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GraceLoadError(f"{path} is not valid JSON ({err})") from None


def read_config(folder: Path) -> dict:
    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GraceLoadError(f"{folder} holds a '{model_type}' model; grace loads Qwen3-VL checkpoints "
                             f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)}) and LLaVA-1.5 ones")
    return config


def detect(folder: Path, config: dict) -> Layout:
    quant = config.get("quantization_config") or {}
    if (folder / AWQ_MODULES_FILE).is_file() or "awq_packing" in config:
        spec = read_json(folder / AWQ_MODULES_FILE)
        packing = config.get("awq_packing", {})
        bits = int(spec.get("bits", packing.get("bits", 4)))
        if bits != 4:
            raise GraceLoadError(f"{folder}: AWQ packing with {bits} bits is not supported (only 4)")
        modules = spec.get("modules")
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise GraceLoadError(f"{folder / AWQ_MODULES_FILE}: 'modules' must be a list of module names")
        return Layout("grace-awq", "int4", 4, int(spec.get("group_size", packing.get("group_size", 128))), modules)
    if quant:
        method = quant.get("quant_method")
        from .gptq_layout import detect_gptq, is_gptq

        if is_gptq(quant):
            return detect_gptq(folder, quant)
        if method != "awq":
            raise GraceLoadError(f"{folder}: quantization method '{method}' is not supported (AWQ GEMM, 4-bit GPTQ / "
                                 "AutoRound and the GRACE layouts are)")
        version = str(quant.get("version", "gemm")).lower()
        if version != "gemm" or int(quant.get("bits", 4)) != 4:
            raise GraceLoadError(f"{folder}: AWQ version '{version}' with {quant.get('bits')} bits is not "
                                 "supported (only 4-bit GEMM)")
        return Layout("hf-awq", "int4", 4, int(quant.get("group_size", 128)),
                      skip=list(quant.get("modules_to_not_convert") or []))
    if (folder / INT8_MODULES_FILE).is_file() or "int8_packing" in config:
        spec = read_json(folder / INT8_MODULES_FILE)
        return Layout("grace-int8", "int8", 8, int(spec.get("group_size", 128)), list(spec.get("modules", [])))
    if "qat" in config:
        qat = config["qat"]
        bits = int(qat.get("bits", 4))
        if bits not in (4, 8):
            raise GraceLoadError(f"{folder}: QAT release with {bits} bits is not supported (4 or 8)")
        return Layout("grace-qat", f"int{bits}", bits, int(qat.get("group_size", 128)),
                      skip=list(qat.get("skip_keywords") or []))
    return Layout("plain", "bf16")


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
        files = [f for f in files if not f.name.startswith("expected")] or files
        if (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise GraceLoadError(f"{folder}: no model weights found ({', '.join(missing) or 'no *.safetensors'})")
    return files


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, on CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise GraceLoadError(f"{file} is truncated or corrupt and cannot be read ({err}); "
                                 "download it again") from None
    return tensors


def read_sidecar(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd dict of tensors, read without running any pickled code."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many types; every one means "not a plain tensor dict"
        raise GraceLoadError(f"{path} is not a plain dict of tensors and was not loaded "
                             f"(only weights-only pickles are read): {str(err).splitlines()[0][:200]}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise GraceLoadError(f"{path} is not a dict of named tensors")
    return data


def name_matches(name: str, patterns: list[str]) -> bool:
    """True when a pattern is a dotted component run of `name` ("visual" matches "model.visual.x")."""
    parts = name.split(".")
    for pattern in patterns:
        want = pattern.split(".")
        if any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1)):
            return True
    return False
