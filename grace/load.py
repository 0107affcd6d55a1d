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
from .checkpoint_files import read_config, read_json, read_tensors, safetensors_files
from .errors import GraceLoadError
from .formats import detect_format
from .cpu_decode import use_cpu_decode_
from .quant.bf16 import fast_bf16_linears_
from .quant.head import quantize_head_
from .quant.qlinear import QuantizedLinear


@dataclass
class LoadedModel:
    model: Qwen3VLForConditionalGeneration
    processor: object
    source: str              # what the user asked for (repo id or path)
    path: Path               # the local folder it was read from
    format: str              # on-disk checkpoint format: plain | grace-awq | hf-awq | grace-qat | grace-int8
    checkpoint_kind: str     # what the checkpoint's linears mean: bf16 | int8 | int4
    head: str = "bf16"       # lm_head as served: bf16 (as released) | int8 | int4 (load(head=...))

    @property
    def quantized_modules(self) -> list[str]:
        return [n for n, m in self.model.named_modules() if isinstance(m, QuantizedLinear)]

    @property
    def packed(self) -> bool:
        """Some linears are held as low-bit codes (after loading a quantized format, or `quantize_`)."""
        return any(isinstance(m, QuantizedLinear) for m in self.model.modules())

    @property
    def kind(self) -> str:
        """int4 / int8 from the quantized modules held (mixed for both); with none, what the
        checkpoint's weights mean: bf16, or the grid's int4 / int8 of a QAT release held unpacked."""
        head = self.model.get_output_embeddings()   # an optional quantized head (load(head=)) is not the model's kind
        bits = {m.bits for m in self.model.modules() if isinstance(m, QuantizedLinear) and m is not head}
        if not bits:
            return self.checkpoint_kind
        return f"int{bits.pop()}" if len(bits) == 1 else "mixed"

    @property
    def weight_bytes(self) -> int:
        """Bytes of parameters and buffers as actually held (shared tensors counted once)."""
        return tensor_bytes(self.model)

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


def _prepare_for_serving(model: nn.Module, device: torch.device, head: str | None) -> None:
    """What every architecture gets after its weights are placed: the optional quantized head, and
    on CPU the few-row bf16 linears off oneDNN (grace/quant/bf16.py) and the decode-step attention
    (grace/cpu_decode.py)."""
    if head is not None:
        quantize_head_(model, head)
    if device.type == "cpu":
        fast_bf16_linears_(model)
        use_cpu_decode_(model)


def load(source: str | os.PathLike, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         packed: bool = True, revision: str | None = None, vision_tower: str | os.PathLike | None = None,
         head: str | None = None) -> LoadedModel:
    """Load any GRACE release format (Qwen3-VL and LLaVA-1.5), a Qwen3-VL checkpoint, a transformers AWQ or
    a GPTQ / AutoRound checkpoint.

    source: local folder or Hub repo id. device: default CUDA when available, else CPU.
    dtype: of the non-quantized weights and activations (default bfloat16).
    packed: hold quantized linears as real 4/8-bit weights; False keeps a QAT release as stored.
    vision_tower: LLaVA only: folder (or repo id) of the CLIP tower the config's mm_vision_tower names,
    for offline machines and mirrors (else $GRACE_VISION_TOWER, else the Hub / its local cache).
    head: "int8" / "int4" quantizes lm_head round-to-nearest (faster decode, changes the numerics;
    see grace/quant/head.py for the bytes of a tied embedding); default None keeps the bf16 head.
    """
    from .processor import build_processor

    folder = hub.resolve(source, revision=revision)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.bfloat16
    from .llava import is_llava, load_llava

    if is_llava(raw := read_json(folder / "config.json")):
        loaded = load_llava(folder, source, raw, device=device, dtype=dtype, packed=packed, vision_tower=vision_tower)
        _prepare_for_serving(loaded.model, device, head)
        loaded.head = head or "bf16"
        return loaded
    config_dict = read_config(folder)
    fmt, info = detect_format(folder, config_dict)
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
        if fmt.place is not None and (packed or not fmt.stores_plain_weights):
            fmt.place(model, info, tensors, folder, device, dtype)
        _load_plain(model, tensors, folder, device, dtype)
    _prepare_for_serving(model, device, head)
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    try:
        processor = build_processor(folder)
    except (OSError, ValueError, TypeError) as err:
        raise GraceLoadError(f"{folder}: the processor (tokenizer / image processor / chat template) could not "
                             f"be built: {err}") from None
    return LoadedModel(model, processor, str(source), folder, fmt.name, info.kind, head or "bf16")


def _load_plain(model: nn.Module, tensors: dict, folder: Path, device, dtype) -> None:
    """Every remaining tensor goes to its parameter / buffer; nothing may be missing or left over."""
    state = {}
    for key, value in tensors.items():
        state[key] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
    result = model.load_state_dict(state, strict=False, assign=True)
    quantized = tuple(n + "." for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
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
