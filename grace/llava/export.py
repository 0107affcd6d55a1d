"""Writing a LLaVA-1.5 INT4 model: the GRACE `-AWQ` release layout and the llava-hf AWQ layout.

- `save_llava_awq`: what the authors' deploy script (`qat_to_awq.py` + `deploy_awq_llava.py`) writes:
  original LLaVA names, AutoAWQ GEMM tensors for the INT4 linears, everything else fp16 (the vision
  tower copy included), one `model.safetensors`, `awq_quantized_modules.json` listing the modules
  sorted as strings, and the QAT config plus `awq_packing`, `torch_dtype: float16`, no
  `quantization_config`. The tokenizer files are copied from the source.
- `save_llava_hf_awq`: the llava-hf layout (`LlavaForConditionalGeneration` config, the llava-hf hub
  tensor names `language_model.model.*` / `vision_tower.vision_model.*` / `multi_modal_projector.*`, the
  processor saved beside it) with `quantization_config` (see grace/export_hf_awq.py), what vLLM serves. As llava-hf does, the placeholder `<image>` gets a row in `lm_head` too (the mean row, so
  it is never the likeliest token by construction of a zero row).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..export import _write_folder
from ..export_hf_awq import awq_module_tensors, save_hf_awq, unquantized_tensors
from ..formats import AWQ_MODULES_FILE
from ..quant.int4 import Int4Linear
from . import naming
from .config import is_original_llava, original_config

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


class _CopyFiles:
    """Stands in for a processor in `_write_folder`: copies the release's own tokenizer files."""

    def __init__(self, files: list[Path]):
        self.files = files

    def save_pretrained(self, folder) -> None:
        for f in self.files:
            shutil.copyfile(f, Path(folder) / f.name)


def _tokenizer_files(loaded) -> list[Path]:
    source = Path(loaded.processor.tokenizer.vocab_file).parent
    files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not any(f.name == "tokenizer.model" for f in files):
        raise ValueError(f"no tokenizer.model beside the source tokenizer ({source}) to copy into the export")
    return files


def _release_config(loaded, group_size: int) -> dict:
    path = Path(loaded.path) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not is_original_llava(config):
        config = original_config(loaded.model.config)
    config.pop("quantization_config", None)
    name = str(loaded.source).rstrip("/").split("/")[-1]
    config.update({"_name_or_path": name, "torch_dtype": "float16",
                   "awq_packing": {"bits": 4, "group_size": group_size, "version": "gemm", "zero_point": 8}})
    return dict(sorted(config.items()))   # the 4.37 save is key-sorted


def save_llava_awq(loaded, out_dir) -> Path:
    """A loaded LLaVA INT4 model (e.g. the QAT release loaded packed) -> the GRACE LLaVA AWQ release layout."""
    model = loaded.model
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    if not int4:
        raise ValueError("the model has no Int4Linear layers to pack")
    groups = {m.group_size for m in int4.values()}
    if len(groups) != 1:
        raise ValueError(f"the INT4 layers use several group sizes {sorted(groups)}")
    vocab = model.lm_head.out_features

    def to_release(key, value):
        if key == "model.language_model.embed_tokens.weight":
            value = value[:vocab]                     # the placeholder row is ours, not the release's
        return naming.to_original(key), value

    tensors = unquantized_tensors(model, int4, rename=to_release)
    tensors.update(awq_module_tensors(int4, rename=naming.to_original))
    originals = {naming.to_original(name): module for name, module in int4.items()}
    group = groups.pop()
    spec = {"bits": 4, "group_size": group, "modules": sorted(originals)}
    out = _write_folder(out_dir, model, _CopyFiles(_tokenizer_files(loaded)), tensors, _release_config(loaded, group),
                        {AWQ_MODULES_FILE: spec})
    return out


def save_llava_hf_awq(loaded, out_dir) -> Path:
    """A loaded LLaVA INT4 model -> transformers' LLaVA naming with an AWQ `quantization_config`."""
    model = loaded.model
    head = model.lm_head
    rows = model.config.text_config.vocab_size
    config = model.config.to_dict()
    for key in ("original_vocab_size", "image_aspect_ratio", "mm_vision_tower", "vision_tower_path"):
        config.pop(key, None)
    if head.out_features != rows:   # give the placeholder its lm_head row, as llava-hf does
        padded = torch.nn.Linear(head.in_features, rows, bias=False, dtype=head.weight.dtype)
        with torch.no_grad():
            padded.weight[: head.out_features] = head.weight.detach().cpu()
            padded.weight[head.out_features:] = head.weight.detach().cpu().mean(0)
        model.lm_head = padded
    try:
        return save_hf_awq(model, loaded.processor, out_dir, config, rename=naming.hf_to_llava_hf_v4)
    finally:
        model.lm_head = head


def save_llava_qat_release(model, processor, out_dir, qat_config, tokenizer_files: list[Path] | None = None) -> Path:
    """A LLaVA model under QAT (`grace.distill.apply_qat`) -> the GRACE LLaVA QAT release layout (`-W4G128`):
    original names, the grid weights W_dq stored bf16 (the vision-tower copy too, as DeepSpeed saved it),
    the sidecar `qat_quantized_weights.bin` (`<module>.weight`, `<module>.log_scale` under original names)
    and the original config plus `qat` (with the original codebase's skip keywords)."""
    from ..distill.fake_quant import fake_quant_modules, qat_state_dict
    from ..formats import QAT_SIDECAR
    from .tiny import original_tensors

    quantized = fake_quant_modules(model)
    if not quantized:
        raise ValueError("no fake-quantized linears in the model: apply_qat first")
    sidecar = {naming.to_original(k): v for k, v in qat_state_dict(model).items()}
    tensors = {k: v for k, v in original_tensors(model).items() if not k.endswith(".log_scale")}
    for key, value in sidecar.items():
        if key.endswith(".weight"):
            tensors[key] = value.clone()
    config = original_config(model.config)
    config["qat"] = {"bits": int(qat_config.bits), "group_size": int(qat_config.group_size), "learn_scales": True,
                     "num_replaced": len(quantized),
                     "skip_keywords": ["mm_projector", "vision_tower", "vision_resampler", "lm_head", "embed_tokens"]}
    files = tokenizer_files or [f for f in (Path(processor.tokenizer.vocab_file).parent / n for n in TOKENIZER_FILES)
                                if f.is_file()]
    return _write_folder(out_dir, model, _CopyFiles(files), tensors, dict(sorted(config.items())), {QAT_SIDECAR: sidecar})
