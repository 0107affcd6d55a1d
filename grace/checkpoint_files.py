"""Reading a checkpoint folder's files: config and JSON sidecars, safetensors headers and tensors,
and pickled sidecars (weights-only). Every failure is a GraceLoadError that says which file and why."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import GraceLoadError

# model_type -> the transformers class grace builds for it
ARCHITECTURES = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "llava": "LlavaForConditionalGeneration",
                 "llava_llama": "LlavaForConditionalGeneration"}   # llava_llama: the original LLaVA codebase's name
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GraceLoadError(f"{path.parent} has no {path.name}: not a transformers checkpoint folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GraceLoadError(f"{path} is not valid JSON ({err})") from None


def read_config(folder: Path) -> dict:
    """config.json, checked to be a model type grace loads."""
    config = read_json(folder / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GraceLoadError(f"{folder} holds a '{model_type}' model; grace loads Qwen3-VL and LLaVA-1.5 checkpoints "
                             f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)})")
    return config


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files: the shards an index names, else model.safetensors, else every *.safetensors
    but the fixtures' expected*.safetensors references."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
    else:
        files = [f for f in sorted(folder.glob("*.safetensors")) if not f.name.startswith("expected")]
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


# A safetensors file starts with the little-endian u64 length of a JSON header naming every
# tensor's dtype, shape and byte range; the header alone tells what the file holds.
MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(file: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape"}} from a safetensors file's header, reading no tensor data."""
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as err:
        raise GraceLoadError(f"{file} is not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return {k: {"dtype": v.get("dtype"), "shape": v.get("shape")} for k, v in header.items() if isinstance(v, dict)}


def tensor_headers(folder: Path) -> dict[str, dict]:
    """Every tensor of a checkpoint folder with its dtype and shape, from the file headers alone.
    Where the index names shards that are not there (a folder fetched for its JSON files only),
    the names the index lists, with dtype and shape None."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        if not all((folder / shard).is_file() for shard in set(weight_map.values())):
            return {name: {"dtype": None, "shape": None} for name in weight_map}
    headers: dict[str, dict] = {}
    for file in safetensors_files(folder):
        headers.update(read_safetensors_header(file))
    return headers


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
