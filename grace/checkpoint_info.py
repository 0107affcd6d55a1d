"""`grace.inspect(source) -> CheckpointInfo`: what a checkpoint is, without reading its weights.

It reads config.json, the formats' JSON sidecars and, where it must count packed tensors, the
safetensors headers (the JSON at the start of each file), never tensor data or pickles. A Hub
repo id fetches only its *.json files (`huggingface_hub.snapshot_download`); where a count needs
the tensor names of an unsharded Hub checkpoint, they come from its safetensors header
(`HfApi.get_safetensors_metadata`, ranged requests), or stay unknown offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .checkpoint_files import ARCHITECTURES, read_config, tensor_headers
from .errors import GraceLoadError
from .formats import FormatInfo, detect_format
from .quant.quantize import name_matches


@dataclass(frozen=True)
class CheckpointInfo:
    source: str                     # what was asked for (folder or repo id)
    path: Path                      # the local folder read (for a repo id: the cache folder of its JSON files)
    format: str                     # on-disk format, as `LoadedModel.format`: plain | grace-awq | hf-awq | grace-qat | grace-int8
    kind: str                       # what its linears mean: bf16 | int8 | int4 (as `LoadedModel.kind` after `grace.load`)
    bits: int                       # 16 for plain weights
    group_size: int | None          # input columns per scale; None for plain weights
    quantized_modules: int | None   # how many linears are quantized; None where that needs the weights
    architecture: str               # the transformers class it loads as, e.g. Qwen3VLForConditionalGeneration
    model_type: str


def inspect(source: str | os.PathLike, *, revision: str | None = None) -> CheckpointInfo:
    """What `grace.load(source)` would load: format, kind, bits, group size, how many quantized
    linears, architecture. Raises GraceLoadError where `grace.load` would refuse the checkpoint's
    config or format (missing folder, not Qwen3-VL, unsupported quantization)."""
    remote = not Path(source).expanduser().exists() and hub.is_repo_id(str(source))
    folder = hub.resolve(source, revision=revision, files=hub.CONFIG_FILES)
    config = read_config(folder)
    _, info = detect_format(folder, config)
    count = info.count
    if count is None:
        count = _count_from_tensors(info, _tensor_headers(folder, str(source), revision, remote))
    return CheckpointInfo(str(source), folder, info.format, info.kind, info.bits, info.group_size, count,
                          ARCHITECTURES[config["model_type"]], config["model_type"])


def _tensor_headers(folder: Path, repo_id: str, revision: str | None, remote: bool) -> dict[str, dict] | None:
    try:
        return tensor_headers(folder)
    except GraceLoadError:
        if not remote:
            raise
    try:   # an unsharded Hub checkpoint: its header, fetched by ranged requests
        from huggingface_hub import HfApi

        metadata = HfApi().get_safetensors_metadata(repo_id, revision=revision)
        return {name: {"dtype": t.dtype, "shape": t.shape}
                for file in metadata.files_metadata.values() for name, t in file.tensors.items()}
    except Exception:  # offline, not cached, no safetensors: the count stays unknown
        return None


def _count_from_tensors(info: FormatInfo, headers: dict[str, dict] | None) -> int | None:
    if headers is None:
        return None
    if info.format in ("hf-awq", "gptq", "auto-round"):
        return sum(name.endswith(".qweight") for name in headers)
    if info.format == "grace-qat":   # no num_replaced: the 2-D linear weights `quantize_`'s rule picks
        weights = {n[: -len(".weight")]: h for n, h in headers.items() if n.endswith(".weight")}
        if any(h["shape"] is None for h in weights.values()):
            return None
        return sum(len(h["shape"]) == 2 and not name_matches(n, info.skip) for n, h in weights.items())
    return None   # a format whose `describe` does not count its modules
