"""The GPTQ-format layouts AutoRound (and AutoGPTQ) write, read into `Int4Linear`.

Two `quantization_config`s carry the same tensors (see grace/quant/gptq_pack.py):
- `quant_method: "gptq"` (AutoRound's `format="auto_gptq"`, AutoGPTQ, gptqmodel) -> format "gptq";
- `quant_method: "auto-round"` with `packing_format` "auto_round:auto_gptq" / "auto_round:gptq"
  (AutoRound's native export) -> format "auto-round".
The quantized modules are exactly those with `<module>.qweight` in the checkpoint: a GPTQ export
may name no blocks, and guessing them from block names is how auto-round's own loader breaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import GraceLoadError
from .formats import CheckpointFormat, FormatInfo
from .quant import gptq_pack
from .quant.int4 import Int4Linear
from .quant.quantize import replace_module

GPTQ_PACKINGS = ("auto_round:auto_gptq", "auto_round:gptq")


@dataclass
class GPTQInfo(FormatInfo):
    zero_offset: int = 1                                   # v1 stores zero - 1; gptq_v2 stores the zero
    desc_act: bool = False
    blocks: list[str] = field(default_factory=list)        # block_name_to_quantize, when the config names any


def describe_gptq(folder: Path, config: dict) -> GPTQInfo:
    quant = config["quantization_config"]
    method = quant.get("quant_method")
    if method == "auto-round":
        packing = str(quant.get("packing_format", "auto_round:auto_gptq"))
        if not packing.startswith(GPTQ_PACKINGS):
            raise GraceLoadError(f"{folder}: AutoRound packing '{packing}' is not supported; grace reads AutoRound "
                                 "checkpoints exported in the GPTQ packing (packing_format auto_round:auto_gptq). "
                                 "Re-export with format='auto_gptq' or 'auto_round:auto_gptq'.")
    bits = int(quant.get("bits", 4))
    if bits != 4:
        raise GraceLoadError(f"{folder}: a {bits}-bit {method} checkpoint; grace reads 4-bit GPTQ weights only")
    if str(quant.get("data_type", "int")) != "int":
        raise GraceLoadError(f"{folder}: {method} data type '{quant.get('data_type')}' is not supported (only int)")
    version = str(quant.get("checkpoint_format", "gptq")).lower()
    if version not in ("gptq", "gptq_v2"):
        raise GraceLoadError(f"{folder}: GPTQ checkpoint format '{version}' is not supported (gptq or gptq_v2)")
    blocks = quant.get("block_name_to_quantize") or []
    if isinstance(blocks, str):
        blocks = [b for b in blocks.split(",") if b]
    return GPTQInfo(method, "int4", 4, int(quant.get("group_size", 128)), zero_offset=0 if version == "gptq_v2" else 1,
                    desc_act=bool(quant.get("desc_act", False)), blocks=list(blocks))


def _take(tensors: dict, name: str, suffix: str, folder: Path) -> torch.Tensor:
    if name + suffix not in tensors:
        raise GraceLoadError(f"{folder}: quantized module '{name}' has no {name + suffix} in the weights")
    return tensors.pop(name + suffix)


def place_gptq(model, info: GPTQInfo, tensors: dict, folder: Path, device, dtype) -> None:
    """Swap every linear that has `<name>.qweight` for an Int4Linear holding its codes; pops what it uses."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    if not found:
        raise GraceLoadError(f"{folder}: the config says {info.format}, but no tensor ends in .qweight")
    for name in found:
        if name not in linears:
            raise GraceLoadError(f"{folder}: packed weights for '{name}', which is not a linear layer of this model")
        if info.blocks and not any(name == b or name.startswith(b + ".") for b in info.blocks):
            raise GraceLoadError(f"{folder}: '{name}' is quantized but lies outside block_name_to_quantize "
                                 f"({', '.join(info.blocks)})")
        qweight, qzeros, scales = (_take(tensors, name, s, folder) for s in (".qweight", ".qzeros", ".scales"))
        g_idx = tensors.pop(name + ".g_idx", None)
        if info.desc_act and g_idx is None:
            raise GraceLoadError(f"{folder}: desc_act is set but '{name}' has no g_idx, so its groups are unknown")
        linear = linears[name]
        if (qweight.shape[0] * 8, qweight.shape[1]) != (linear.in_features, linear.out_features):
            raise GraceLoadError(f"{folder}: the weights are not in the {info.format} (GPTQ) packing the config "
                                 f"names: '{name}.qweight' has shape {tuple(qweight.shape)}, GPTQ would be "
                                 f"{(linear.in_features // 8, linear.out_features)}")
        codes, scale, zeros, group = gptq_pack.decode(qweight, qzeros, scales, info.group_size, g_idx,
                                                      info.zero_offset, name=f"{folder}: {name}")
        replace_module(model, name, Int4Linear.from_codes(codes, scale, zeros, bias=tensors.pop(name + ".bias", None),
                                                          group_size=group, dtype=dtype, device=device))


def _method(config: dict):
    return (config.get("quantization_config") or {}).get("quant_method")


# the entries of grace.formats.FORMATS for these layouts
GPTQ_FORMATS = [CheckpointFormat("gptq", lambda folder, config: _method(config) == "gptq", describe_gptq, place_gptq),
                CheckpointFormat("auto-round", lambda folder, config: _method(config) == "auto-round", describe_gptq,
                                 place_gptq)]
