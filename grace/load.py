"""`grace.load`: any GRACE release (or Qwen3-VL / AWQ checkpoint) -> a model that generates.

The model is built empty (parameters on the meta device), its quantized linears are
swapped for `Int4Linear` / `Int8Linear` before any weight is read, and every tensor is
then placed once, on the target device, in its final form. `from_pretrained` alone would
leave AWQ layers random and keep QAT releases in bf16.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from . import hub
from .errors import GraceLoadError
from .gptq_layout import GPTQ_FORMATS, place_gptq
from .layout import (QAT_SIDECAR, Layout, detect, name_matches, read_config, read_json, read_sidecar, read_tensors,
                     safetensors_files)
from .quant import awq_pack
from .quant.int4 import Int4Linear
from .quant.int8 import Int8Linear
from .quant.grid import codes_on_grid
from .quant.quantize import replace_module


@dataclass
class LoadedModel:
    model: Qwen3VLForConditionalGeneration
    processor: object
    kind: str            # "bf16" | "int8" | "int4": what the checkpoint's linears mean
    source: str          # what the user asked for (repo id or path)
    path: Path           # the local folder it was read from
    format: str          # on-disk layout: plain | grace-awq | hf-awq | grace-qat | grace-int8 | gptq | auto-round
    packed: bool         # quantized linears held as low-bit codes (False: plain weights)

    @property
    def weight_bytes(self) -> int:
        """Bytes of parameters and buffers as actually held (shared tensors counted once)."""
        return tensor_bytes(self.model)

    @property
    def quantized_modules(self) -> list[str]:
        return [n for n, m in self.model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def tensor_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.device, t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# accelerate's init_empty_weights patches torch.nn for the whole process while a model is built, so
# two loads at once (an app serving several users) would put each other's tensors on the meta device.
_BUILD_LOCK = threading.Lock()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(source: str | os.PathLike, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         packed: bool = True, revision: str | None = None, vision_tower: str | os.PathLike | None = None) -> LoadedModel:
    """Load any GRACE release format, a Qwen3-VL checkpoint or a transformers AWQ checkpoint.

    source: local folder or Hub repo id. device: default CUDA when available, else CPU.
    dtype: of the non-quantized weights and activations (default bfloat16).
    packed: hold quantized linears as real 4/8-bit weights; False keeps a QAT release as stored.
    vision_tower: LLaVA only: folder (or repo id) of the CLIP tower the config's mm_vision_tower names,
    for offline machines and mirrors (else $GRACE_VISION_TOWER, else the Hub / its local cache).
    """
    from .processor import build_processor

    folder = hub.resolve(source, revision=revision)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.bfloat16
    from .llava import is_llava, load_llava

    if is_llava(raw := read_json(folder / "config.json")):
        return load_llava(folder, source, raw, device=device, dtype=dtype, packed=packed, vision_tower=vision_tower)
    config_dict = read_config(folder)
    layout = detect(folder, config_dict)
    try:
        config = Qwen3VLConfig.from_pretrained(folder)
    except Exception as err:
        raise GraceLoadError(f"{folder}/config.json is not a valid Qwen3-VL configuration: {err}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # handled here; transformers' own AWQ path needs gptqmodel

    tensors = read_tensors(safetensors_files(folder))
    with _BUILD_LOCK:
        with init_empty_weights(include_buffers=False):
            model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
        _place_model(model, layout, tensors, folder, device, dtype, packed)
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    try:
        processor = build_processor(folder)
    except (OSError, ValueError, TypeError) as err:
        raise GraceLoadError(f"{folder}: the processor (tokenizer / image processor / chat template) could not "
                             f"be built: {err}") from None
    # only a QAT release can be held unpacked: the other quantized layouts have no plain weights
    held_packed = layout.format != "plain" and (packed or layout.format != "grace-qat")
    return LoadedModel(model, processor, layout.kind, str(source), folder, layout.format, held_packed)


# -- placing tensors ------------------------------------------------------------------------------------

def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _place_model(model, layout: Layout, tensors, folder: Path, device, dtype, packed: bool, sidecar=None) -> None:
    """sidecar: the QAT sidecar under the model's names (default: read from the folder as is)."""
    linears = _linears(model)
    if layout.format in ("grace-awq", "hf-awq"):
        _place_awq(model, layout, linears, tensors, folder, device, dtype)
    elif layout.format == "grace-int8":
        _place_int8(model, layout, linears, tensors, folder, device, dtype)
    elif layout.format in GPTQ_FORMATS:
        place_gptq(model, layout, linears, tensors, folder, device, dtype)
    elif layout.format == "grace-qat" and packed:
        _place_qat(model, layout, linears, tensors, folder, device, dtype, sidecar)
    _load_plain(model, tensors, folder, device, dtype)


def _take(tensors: dict, name: str, suffixes: tuple[str, ...], folder: Path) -> list[torch.Tensor]:
    missing = [name + s for s in suffixes if name + s not in tensors]
    if missing:
        raise GraceLoadError(f"{folder}: quantized module '{name}' has no {', '.join(missing)} in the weights")
    return [tensors.pop(name + s) for s in suffixes]


def _place_awq(model, layout, linears, tensors, folder, device, dtype) -> None:
    found = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    if layout.format == "grace-awq":
        absent = [m for m in layout.modules if m not in linears]
        if absent:
            raise GraceLoadError(f"{folder}: awq_quantized_modules.json names {len(absent)} module(s) that are not "
                                 f"linear layers of this model, e.g. '{absent[0]}'")
        names = layout.modules
        stray = sorted(set(found) - set(names))
        if stray:
            raise GraceLoadError(f"{folder}: packed weights for '{stray[0]}' are not listed in awq_quantized_modules.json")
    else:
        names = found
        wrong = [m for m in names if m not in linears or name_matches(m, layout.skip)]
        if wrong:
            raise GraceLoadError(f"{folder}: packed weights for '{wrong[0]}', which is not a quantizable linear "
                                 "(absent, or in modules_to_not_convert)")
    for name in names:
        linear = linears[name]
        qweight, qzeros, scales = _take(tensors, name, (".qweight", ".qzeros", ".scales"), folder)
        expect = (linear.in_features, linear.out_features // 8)
        if tuple(qweight.shape) != expect:
            raise GraceLoadError(f"{folder}: '{name}.qweight' has shape {tuple(qweight.shape)}, expected {expect}")
        module = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, layout.group_size,
                            dtype, device)
        module.set_codes(awq_pack.unpack(qweight).t(), scales.float().t(), awq_pack.unpack(qzeros).t())
        if module.bias is not None:
            module.bias.data = _take(tensors, name, (".bias",), folder)[0].to(device, dtype)
        replace_module(model, name, module)


def _place_int8(model, layout, linears, tensors, folder, device, dtype) -> None:
    for name in layout.modules:
        if name not in linears:
            raise GraceLoadError(f"{folder}: int8_quantized_modules.json names '{name}', not a linear of this model")
        linear = linears[name]
        qweight, scales = _take(tensors, name, (".qweight", ".scales"), folder)
        module = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, layout.group_size,
                            dtype, device)
        module.set_codes(qweight, scales.float())
        if module.bias is not None:
            module.bias.data = _take(tensors, name, (".bias",), folder)[0].to(device, dtype)
        replace_module(model, name, module)


def qat_module_names(linears: dict, skip: list[str]) -> list[str]:
    return [n for n in linears if not any(k in n for k in skip)]


def _place_qat(model, layout, linears, tensors, folder, device, dtype, sidecar=None) -> None:
    if sidecar is None:
        sidecar = read_sidecar(folder / QAT_SIDECAR) if (folder / QAT_SIDECAR).is_file() else {}
    if sidecar:
        names = sorted({k[: -len(".log_scale")] for k in sidecar if k.endswith(".log_scale")})
    else:
        names = qat_module_names(linears, layout.skip)
    absent = [n for n in names if n not in linears]
    if absent:
        raise GraceLoadError(f"{folder}: {QAT_SIDECAR} names '{absent[0]}', not a linear of this model")
    for name in names:
        linear = linears[name]
        stored = tensors.pop(name + ".weight", None)
        weight = sidecar.get(name + ".weight", stored)
        if weight is None:
            raise GraceLoadError(f"{folder}: no weight for QAT module '{name}'")
        log_scale = sidecar.get(name + ".log_scale")
        codes, scales = codes_on_grid(weight.float(), layout.bits, layout.group_size,
                                      None if log_scale is None else log_scale.float().exp())
        bias = tensors.pop(name + ".bias", None)
        if layout.bits == 4:
            module = Int4Linear(linear.in_features, linear.out_features, bias is not None, layout.group_size, dtype, device)
            module.set_codes((codes + 8).to(torch.uint8), scales, torch.full_like(scales, 8))
        else:
            module = Int8Linear(linear.in_features, linear.out_features, bias is not None, layout.group_size, dtype, device)
            module.set_codes(codes, scales)
        if bias is not None:
            module.bias.data = bias.to(device, dtype)
        replace_module(model, name, module)


def _load_plain(model: nn.Module, tensors: dict, folder: Path, device, dtype) -> None:
    """Every remaining tensor goes to its parameter / buffer; nothing may be missing or left over."""
    state = {}
    for key, value in tensors.items():
        state[key] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
    result = model.load_state_dict(state, strict=False, assign=True)
    quantized = tuple(n + "." for n, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear)))
    missing = [k for k in result.missing_keys if k != "lm_head.weight" and not k.startswith(quantized)]
    if result.unexpected_keys:
        raise GraceLoadError(f"{folder}: the weights hold tensors this Qwen3-VL model does not have, e.g. "
                             f"'{result.unexpected_keys[0]}' ({len(result.unexpected_keys)} in all)")
    if "lm_head.weight" in result.missing_keys:
        if not getattr(model.config, "tie_word_embeddings", False):
            missing.append("lm_head.weight")
        else:
            model.lm_head.weight = model.get_input_embeddings().weight
    if missing:
        raise GraceLoadError(f"{folder}: the weights lack '{missing[0]}' ({len(missing)} tensors missing)")
    model.to(device)   # non-persistent buffers (rotary tables) were built on the CPU
    left_on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise GraceLoadError(f"{folder}: '{left_on_meta[0]}' was never loaded")
