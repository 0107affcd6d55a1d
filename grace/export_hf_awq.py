"""Writing an INT4 model in the standard transformers AWQ layout, the one vLLM and SGLang serve.

`config.json` carries `quantization_config` = {"quant_method": "awq", "bits": 4, "group_size": g,
"version": "gemm", "zero_point": true, "modules_to_not_convert": [...]}; every `Int4Linear` becomes
AutoAWQ GEMM tensors (`qweight`, `qzeros`, `scales`, same packing as the GRACE AWQ release) and
every other tensor is fp16, as AutoAWQ saves it (its GEMM kernels run fp16 activations).
`modules_to_not_convert` names the parts engines must keep as plain linears: the vision tower and
the projector / merger, matched as name components ("visual" covers `model.visual.merger`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .quant.int4 import Int4Linear

HF_AWQ_DTYPE = torch.float16
# Plain (never quantized) parts of each supported architecture, as transformers names them.
NOT_CONVERTED = {"qwen3_vl": ["visual"], "llava": ["vision_tower", "multi_modal_projector"]}


def hf_awq_config(group_size: int, not_converted: list[str]) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True,
            "modules_to_not_convert": list(not_converted)}


def _not_converted(model: nn.Module, int4: dict) -> list[str]:
    names = list(NOT_CONVERTED.get(model.config.model_type, []))
    stray = [n for n in int4 if any(part in n.split(".") for part in names)]
    if stray:
        raise ValueError(f"'{stray[0]}' is INT4 but lies in a part engines keep plain ({', '.join(names)})")
    return names


def unquantized_tensors(model: nn.Module, int4: dict[str, Int4Linear], rename=None) -> dict[str, torch.Tensor]:
    """The model's tensors outside its Int4Linear modules, on CPU, floating ones in fp16 (as AutoAWQ
    saves them); `rename(key, value) -> (key, value)` maps names to another naming (and may trim a tensor)."""
    prefixes = tuple(n + "." for n in int4)
    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefixes):
            continue
        value = value.detach().cpu()
        if rename is not None:
            key, value = rename(key, value)
        tensors[key] = value.to(HF_AWQ_DTYPE) if value.is_floating_point() else value
    return tensors


def awq_module_tensors(int4: dict[str, Int4Linear], rename=lambda name: name) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors (qweight, qzeros, scales, fp16 bias) of each Int4Linear, under rename(name)."""
    from .export import _awq_tensors

    tensors = {}
    for name, module in int4.items():
        tensors.update(_awq_tensors(rename(name), module))
        if module.bias is not None:
            tensors[rename(name) + ".bias"] = module.bias.detach().cpu().to(HF_AWQ_DTYPE)
    return tensors


def hf_awq_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Int4Linear]]:
    """(tensors in the HF AWQ layout under the model's own names, the Int4Linear modules)."""
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    if not int4:
        raise ValueError("the model has no Int4Linear layers: load an INT4 checkpoint (or quantize_) first")
    tensors = unquantized_tensors(model, int4)
    tensors.update(awq_module_tensors(int4))
    return tensors, int4


def save_hf_awq(model: nn.Module, processor, out_dir, config: dict | None = None, rename=None) -> Path:
    """`model` (Int4Linear layers) -> the transformers AWQ layout in out_dir. `config` overrides the
    config dict written (default: the model's own); `rename` maps tensor names for the file."""
    from .export import _write_folder

    tensors, int4 = hf_awq_tensors(model)
    if rename is not None:
        tensors = {rename(k): v for k, v in tensors.items()}
    groups = {m.group_size for m in int4.values()}
    if len(groups) != 1:
        raise ValueError(f"the INT4 layers use several group sizes {sorted(groups)}; the AWQ config holds one")
    config = dict(config if config is not None else model.config.to_dict())
    for key in ("qat", "awq_packing", "int8_packing"):
        config.pop(key, None)
    config["quantization_config"] = hf_awq_config(groups.pop(), _not_converted(model, int4))
    config["torch_dtype"] = config["dtype"] = "float16"
    config["architectures"] = config.get("architectures") or [type(model).__name__]   # what engines dispatch on
    return _write_folder(out_dir, model, processor, tensors, config)
