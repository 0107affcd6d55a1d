"""Loading the GRACE LLaVA-1.5 releases (QAT and AWQ, original LLaVA naming) and llava-hf checkpoints
into transformers' own `LlavaForConditionalGeneration`: no LLaVA codebase, no remote code.

The quantized linears go through the same placement as Qwen3-VL (`grace.load`), after the tensor,
module and sidecar names are mapped to transformers' (`naming`). The vision tower's weights come from
the CLIP checkpoint the config names, as in the original loader (`vision_tower`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

from ..errors import GraceLoadError
from ..checkpoint_files import read_sidecar, read_tensors, safetensors_files
from ..formats import QAT_SIDECAR, detect_format, place_qat
from . import naming, vision_tower as towers
from .config import is_llava_hf, is_original_llava, llava_config
from .processor import build_processor

# the original skip keywords name the projector by its original name
SKIP_ALIASES = {"mm_projector": "multi_modal_projector"}


def is_llava(config: dict) -> bool:
    return is_original_llava(config) or is_llava_hf(config)


def _rename_tensors(tensors: dict, folder: Path) -> dict:
    out = {}
    for key, value in tensors.items():
        if key.startswith(naming.VISION_TOWER_COPY):
            continue   # the original loader reads the tower from mm_vision_tower, never this copy
        name = naming.to_hf(key)
        if name is None:
            raise GraceLoadError(f"{folder}: the weights hold '{key}', which is not a LLaVA-1.5 tensor name")
        out[name] = value
    return out


def _rename_info(info):
    skip = list(info.skip) + [SKIP_ALIASES[k] for k in info.skip if k in SKIP_ALIASES]
    modules = [naming.to_hf(m) or m for m in info.modules]
    return replace(info, modules=modules, skip=skip)


def _pad_embeddings(tensors: dict, rows: int) -> None:
    """The placeholder's extra embedding row (never read: image features replace it)."""
    key = "model.language_model.embed_tokens.weight"
    emb = tensors.get(key)
    if emb is not None and emb.shape[0] == rows - 1:
        tensors[key] = torch.cat([emb, emb.new_zeros(1, emb.shape[1])])


def build_empty(config: LlavaConfig, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """The model on the meta device; `lm_head` as wide as the real vocabulary (not the placeholder row)."""
    with init_empty_weights(include_buffers=False):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        vocab = getattr(config, "original_vocab_size", None)
        if vocab is not None and vocab != model.lm_head.out_features:
            model.lm_head = nn.Linear(config.text_config.hidden_size, vocab, bias=False, dtype=dtype)
    return model


def load_llava(folder: Path, source, config_dict: dict, *, device, dtype, packed: bool, vision_tower=None):
    from ..load import _BUILD_LOCK, _load_plain   # grace.load imports this module lazily

    if is_llava_hf(config_dict):
        return _load_llava_hf(folder, source, config_dict, device=device, dtype=dtype)
    fmt, info = detect_format(folder, config_dict)
    if fmt.name not in ("plain", "grace-qat", "grace-awq"):
        raise GraceLoadError(f"{folder}: a LLaVA checkpoint in the '{fmt.name}' format is not supported "
                             "(plain, GRACE QAT and GRACE AWQ are)")
    tower = towers.read(towers.locate(config_dict, vision_tower))
    config = llava_config(config_dict, tower.config, folder)
    config.vision_tower_path = str(tower.path)   # where this copy's tower came from (a trained student's export)
    processor = build_processor(folder, config, tower.preprocessor)
    tensors = _rename_tensors(read_tensors(safetensors_files(folder)), folder)
    tensors.update(towers.weights(tower))
    _pad_embeddings(tensors, config.text_config.vocab_size)
    info = _rename_info(info)
    with _BUILD_LOCK:
        model = build_empty(config, dtype)
        if fmt.name == "grace-qat" and packed:
            sidecar = {}
            if (folder / QAT_SIDECAR).is_file():
                sidecar = {naming.to_hf(k) or k: v for k, v in read_sidecar(folder / QAT_SIDECAR).items()}
            place_qat(model, info, tensors, folder, device, dtype, sidecar=sidecar)
        elif fmt.place is not None and not fmt.stores_plain_weights:
            fmt.place(model, info, tensors, folder, device, dtype)
        _load_plain(model, tensors, folder, device, dtype)
    return _loaded(model, processor, source, folder, fmt, info)


def _load_llava_hf(folder: Path, source, raw: dict, *, device, dtype):
    """A llava-hf checkpoint: plain (e.g. llava-hf/llava-1.5-7b-hf, the fp16 reference) or in the
    transformers AWQ format (what `grace.export_awq(..., layout="hf")` writes for LLaVA)."""
    from transformers import AutoProcessor

    from ..load import _BUILD_LOCK, _load_plain

    fmt, info = detect_format(folder, raw)
    if fmt.name not in ("plain", "hf-awq"):
        raise GraceLoadError(f"{folder}: a llava-hf checkpoint in the '{fmt.name}' format is not supported "
                             "(plain and transformers AWQ are)")
    try:
        config = LlavaConfig.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise GraceLoadError(f"{folder}: not a readable llava-hf checkpoint (config / processor): {err}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # handled here; transformers' own AWQ path needs gptqmodel
    tensors = {naming.llava_hf_to_hf(k): v for k, v in read_tensors(safetensors_files(folder)).items()}
    with _BUILD_LOCK:
        with init_empty_weights(include_buffers=False):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        if fmt.place is not None:
            fmt.place(model, info, tensors, folder, device, dtype)
        _load_plain(model, tensors, folder, device, dtype)
    return _loaded(model, processor, source, folder, fmt, info)


def _loaded(model, processor, source, folder: Path, fmt, info):
    """The LoadedModel of a placed model, in eval mode, with the checkpoint's generation settings."""
    from ..load import LoadedModel

    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return LoadedModel(model, processor, str(source), folder, fmt.name, info.kind)
