"""Checkpoint formats: which on-disk format a folder uses, and how its quantized linears are built.

`FORMATS` is the table, one entry per format, tried in order; the first whose `recognise`
accepts the folder wins (see the README, "Checkpoint formats"). An entry has
  name       what `LoadedModel.format` / `CheckpointInfo.format` report
  recognise  (folder, config) -> bool, from config.json and which files exist
  describe   (folder, config) -> FormatInfo: kind, bits, group size, named modules, from the
             small JSON files only (never the weights: `grace.inspect` relies on that)
  place      (model, info, tensors, folder, device, dtype) -> None: swaps the quantized linears of
             the empty model for Int4Linear / Int8Linear built from (and popping) their tensors;
             None when the weights are plain. `grace.load` then places every remaining tensor.
  stores_plain_weights  the quantized linears' weights are also stored as plain (grid) tensors, so
             `grace.load(..., packed=False)` can skip `place` and hold them as stored (QAT releases)
Adding a format is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint_files import read_json, read_sidecar
from .errors import GraceLoadError
from .quant import awq_pack
from .quant import primitives as P
from .quant.int4 import Int4Linear
from .quant.int8 import Int8Linear
from .quant.quantize import DEFAULT_SKIP, name_matches, replace_module, target_linears

AWQ_MODULES_FILE = "awq_quantized_modules.json"
INT8_MODULES_FILE = "int8_quantized_modules.json"
QAT_SIDECAR = "qat_quantized_weights.bin"


@dataclass
class FormatInfo:
    """What a checkpoint folder holds: `format` names the on-disk format, `kind` what its linears mean."""

    format: str                    # plain | grace-awq | hf-awq | grace-qat | grace-int8 | gptq | auto-round
    kind: str                      # bf16 | int8 | int4
    bits: int = 16
    group_size: int | None = None
    modules: list[str] = field(default_factory=list)     # quantized linears named by the format's own JSON
    skip: list[str] = field(default_factory=list)        # name components never quantized (hf-awq, qat)
    count: int | None = None                             # quantized linears, where the JSON says how many


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    recognise: Callable[[Path, dict], bool]
    describe: Callable[[Path, dict], FormatInfo]
    place: Callable[..., None] | None
    stores_plain_weights: bool = False


# -- describing (JSON only) ----------------------------------------------------------------------------

def _module_list(path: Path, spec: dict) -> list[str]:
    modules = spec.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise GraceLoadError(f"{path}: 'modules' must be a list of module names")
    return modules


def _grace_awq(folder: Path, config: dict) -> FormatInfo:
    spec, packing = read_json(folder / AWQ_MODULES_FILE), config.get("awq_packing", {})
    bits = int(spec.get("bits", packing.get("bits", 4)))
    if bits != 4:
        raise GraceLoadError(f"{folder}: AWQ packing with {bits} bits is not supported (only 4)")
    modules = _module_list(folder / AWQ_MODULES_FILE, spec)
    return FormatInfo("grace-awq", "int4", 4, int(spec.get("group_size", packing.get("group_size", 128))), modules,
                      count=len(modules))


def _hf_awq(folder: Path, config: dict) -> FormatInfo:
    quant = config["quantization_config"]
    version = str(quant.get("version", "gemm")).lower()
    if version != "gemm" or int(quant.get("bits", 4)) != 4:
        raise GraceLoadError(f"{folder}: AWQ version '{version}' with {quant.get('bits')} bits is not "
                             "supported (only 4-bit GEMM)")
    return FormatInfo("hf-awq", "int4", 4, int(quant.get("group_size", 128)),
                      skip=list(quant.get("modules_to_not_convert") or []))


def _grace_int8(folder: Path, config: dict) -> FormatInfo:
    spec = read_json(folder / INT8_MODULES_FILE)
    modules = _module_list(folder / INT8_MODULES_FILE, spec)
    return FormatInfo("grace-int8", "int8", 8, int(spec.get("group_size", 128)), modules, count=len(modules))


def _grace_qat(folder: Path, config: dict) -> FormatInfo:
    qat = config["qat"]
    bits = int(qat.get("bits", 4))
    if bits not in (4, 8):
        raise GraceLoadError(f"{folder}: QAT release with {bits} bits is not supported (4 or 8)")
    count = qat.get("num_replaced")
    return FormatInfo("grace-qat", f"int{bits}", bits, int(qat.get("group_size", 128)),
                      skip=list(qat.get("skip_keywords") or DEFAULT_SKIP), count=None if count is None else int(count))


def _plain(folder: Path, config: dict) -> FormatInfo:
    return FormatInfo("plain", "bf16", count=0)


# -- placing (the loaders) ---------------------------------------------------------------------------------

def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _take(tensors: dict, name: str, suffixes: tuple[str, ...], folder: Path) -> list[torch.Tensor]:
    missing = [name + s for s in suffixes if name + s not in tensors]
    if missing:
        raise GraceLoadError(f"{folder}: quantized module '{name}' has no {', '.join(missing)} in the weights")
    return [tensors.pop(name + s) for s in suffixes]


def _check_known(names, linears: dict, folder: Path, listed_in: str) -> None:
    absent = [m for m in names if m not in linears]
    if absent:
        raise GraceLoadError(f"{folder}: {listed_in} names {len(absent)} module(s) that are not linear layers of "
                             f"this model, e.g. '{absent[0]}'")


def place_awq(model, info: FormatInfo, tensors: dict, folder: Path, device, dtype) -> None:
    linears = _linears(model)
    found = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    if info.format == "grace-awq":
        _check_known(info.modules, linears, folder, AWQ_MODULES_FILE)
        names = info.modules
        stray = sorted(set(found) - set(names))
        if stray:
            raise GraceLoadError(f"{folder}: packed weights for '{stray[0]}' are not listed in {AWQ_MODULES_FILE}")
    else:
        names = found
        wrong = [m for m in names if m not in linears or name_matches(m, info.skip)]
        if wrong:
            raise GraceLoadError(f"{folder}: packed weights for '{wrong[0]}', which is not a quantizable linear "
                                 "(absent, or in modules_to_not_convert)")
    for name in names:
        linear = linears[name]
        qweight, qzeros, scales = _take(tensors, name, (".qweight", ".qzeros", ".scales"), folder)
        expect = (linear.in_features, linear.out_features // 8)
        if tuple(qweight.shape) != expect:
            raise GraceLoadError(f"{folder}: '{name}.qweight' has shape {tuple(qweight.shape)}, expected {expect}")
        bias = _take(tensors, name, (".bias",), folder)[0] if linear.bias is not None else None
        replace_module(model, name, Int4Linear.from_codes(
            awq_pack.unpack(qweight).t(), scales.float().t(), awq_pack.unpack(qzeros).t(), bias=bias,
            group_size=info.group_size, dtype=dtype, device=device))


def place_int8(model, info: FormatInfo, tensors: dict, folder: Path, device, dtype) -> None:
    linears = _linears(model)
    _check_known(info.modules, linears, folder, INT8_MODULES_FILE)
    for name in info.modules:
        qweight, scales = _take(tensors, name, (".qweight", ".scales"), folder)
        bias = _take(tensors, name, (".bias",), folder)[0] if linears[name].bias is not None else None
        replace_module(model, name, Int8Linear.from_codes(qweight, scales.float(), bias=bias,
                                                          group_size=info.group_size, dtype=dtype, device=device))


def place_qat(model, info: FormatInfo, tensors: dict, folder: Path, device, dtype, sidecar: dict | None = None) -> None:
    """Codes recovered from the grid weights: round(W / exp(log_scale)) with the sidecar, else with
    each group's step inferred from the grid; the linears are the sidecar's, else `quantize_`'s rule.
    `sidecar`: the sidecar already read, under the model's names (LLaVA renames it); default: the folder's."""
    linears = _linears(model)
    if sidecar is None:
        sidecar = read_sidecar(folder / QAT_SIDECAR) if (folder / QAT_SIDECAR).is_file() else {}
    if sidecar:
        names = sorted({k[: -len(".log_scale")] for k in sidecar if k.endswith(".log_scale")})
        _check_known(names, linears, folder, QAT_SIDECAR)
    else:
        names = target_linears(model, info.skip)
    for name in names:
        stored = tensors.pop(name + ".weight", None)
        weight = sidecar.get(name + ".weight", stored)
        if weight is None:
            raise GraceLoadError(f"{folder}: no weight for QAT module '{name}'")
        log_scale = sidecar.get(name + ".log_scale")
        codes, scales = P.codes_on_grid(weight.float(), info.bits, info.group_size,
                                        None if log_scale is None else log_scale.float().exp())
        bias = tensors.pop(name + ".bias", None)
        args = dict(bias=bias, group_size=info.group_size, dtype=dtype, device=device)
        module = (Int4Linear.from_codes(P.signed_to_unsigned(codes, 4), scales, **args) if info.bits == 4
                  else Int8Linear.from_codes(codes, scales, **args))
        replace_module(model, name, module)


# -- the table -------------------------------------------------------------------------------------------------

def _quant_method(config: dict):
    return (config.get("quantization_config") or {}).get("quant_method")


FORMATS: list[CheckpointFormat] = [
    CheckpointFormat("grace-awq", lambda folder, config: (folder / AWQ_MODULES_FILE).is_file() or "awq_packing" in config,
                     _grace_awq, place_awq),
    CheckpointFormat("hf-awq", lambda folder, config: _quant_method(config) == "awq", _hf_awq, place_awq),
    CheckpointFormat("grace-int8", lambda folder, config: (folder / INT8_MODULES_FILE).is_file()
                     or "int8_packing" in config, _grace_int8, place_int8),
    CheckpointFormat("grace-qat", lambda folder, config: "qat" in config, _grace_qat, place_qat,
                     stores_plain_weights=True),
    CheckpointFormat("plain", lambda folder, config: not config.get("quantization_config"), _plain, None),
]


def detect_format(folder: Path, config: dict) -> tuple[CheckpointFormat, FormatInfo]:
    """The table's first entry that recognises the folder, and what it says the folder holds."""
    for fmt in FORMATS:
        if fmt.recognise(folder, config):
            return fmt, fmt.describe(folder, config)
    raise GraceLoadError(f"{folder}: quantization method '{_quant_method(config)}' is not supported (AWQ GEMM, "
                         "4-bit GPTQ / AutoRound and the GRACE formats are)")


# AutoRound's GPTQ-format checkpoints (grace/gptq_format.py builds on the classes above)
from .gptq_format import GPTQ_FORMATS  # noqa: E402

FORMATS[-1:-1] = GPTQ_FORMATS
