"""Writing checkpoints in the GRACE release formats.

- `save_plain`: a plain transformers checkpoint (bf16).
- `save_qat_release`: a model under QAT (fake-quantized linears) -> the GRACE QAT release
  (`-W4G128` / `-W8G128`): grid weights stored bf16, `config.qat`, sidecar `qat_quantized_weights.bin`.
- `export_awq`: a GRACE QAT W4 release (or any INT4 model) -> the GRACE `-AWQ` release: AutoAWQ
  GEMM tensors for the quantized linears, `awq_quantized_modules.json`, `config.awq_packing`.
- `export_int8`: a GRACE QAT W8 release (or any INT8 model) -> this project's packed INT8 format:
  `<module>.qweight` int8 [out, in] and `<module>.scales` fp32 [out, in/group] (W = q * s),
  `int8_quantized_modules.json` and `config.int8_packing`.
None of them writes `quantization_config`, so transformers never tries its own quantizers on them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import GraceLoadError
from .formats import AWQ_MODULES_FILE, INT8_MODULES_FILE, QAT_SIDECAR
from .quant import awq_pack
from .quant.primitives import zero_points_from_offsets
from .quant.int4 import Int4Linear
from .quant.int8 import Int8Linear

RELEASE_DTYPE = torch.bfloat16


def _config_dict(model, add: dict | None = None, drop: tuple[str, ...] = ()) -> dict:
    config = model.config.to_dict()
    for key in ("quantization_config", "qat", "awq_packing", "int8_packing", *drop):
        config.pop(key, None)
    config["torch_dtype"] = "bfloat16"
    config.update(add or {})
    return config


def _write_folder(out_dir, model, processor, tensors: dict, config: dict, sidecars: dict | None = None) -> Path:
    """Write tensors + config + processor into out_dir via a temporary folder, so a failure leaves nothing half-written."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False), encoding="utf-8")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if processor is not None:
        processor.save_pretrained(tmp)
        if getattr(processor, "chat_template", None) and not (tmp / "chat_template.jinja").is_file():
            (tmp / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    for name, payload in (sidecars or {}).items():
        if name.endswith(".json"):
            (tmp / name).write_text(json.dumps(payload, indent=2), encoding="utf-8")
        else:
            torch.save(payload, tmp / name)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _plain_tensors(model: nn.Module, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, value in model.state_dict().items():
        if skip_prefixes and key.startswith(skip_prefixes):
            continue
        value = value.detach().cpu()
        tensors[key] = value.to(RELEASE_DTYPE) if value.is_floating_point() else value
    return tensors


def save_plain(model: nn.Module, processor, out_dir) -> Path:
    """A plain bf16 transformers checkpoint (what `grace.load` reports as kind "bf16")."""
    if any(isinstance(m, (Int4Linear, Int8Linear)) for m in model.modules()):
        raise ValueError("the model holds packed linears; use save_packed")
    return _write_folder(out_dir, model, processor, _plain_tensors(model), _config_dict(model))


def save_qat_release(model: nn.Module, processor, out_dir, qat_config) -> Path:
    """A model whose linears are fake-quantized (`grace.distill.apply_qat`) -> the GRACE QAT release format."""
    quantized = {n: m for n, m in model.named_modules() if hasattr(m, "log_scale") and hasattr(m, "quantized_weight")}
    if not quantized:
        raise ValueError("no fake-quantized linears in the model: apply_qat first (or use save_plain for bits 16)")
    tensors = _plain_tensors(model)
    sidecar = {}
    for name, module in quantized.items():
        tensors.pop(name + ".log_scale", None)
        grid = module.quantized_weight().detach().cpu().to(RELEASE_DTYPE)
        tensors[name + ".weight"] = grid
        sidecar[name + ".weight"] = grid.clone()
        sidecar[name + ".log_scale"] = module.log_scale.detach().cpu().float().reshape(-1).clone()
    qat = {"bits": int(qat_config.bits), "group_size": int(qat_config.group_size),
           "skip_keywords": list(qat_config.skip_keywords), "num_replaced": len(quantized)}
    return _write_folder(out_dir, model, processor, tensors, _config_dict(model, {"qat": qat}), {QAT_SIDECAR: sidecar})


def save_packed(model: nn.Module, processor, out_dir) -> Path:
    """A model with Int4Linear (-> GRACE AWQ format) or Int8Linear (-> packed INT8 format) modules."""
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    if bool(int4) == bool(int8):
        raise ValueError("save_packed needs a model whose quantized linears are all Int4Linear or all Int8Linear")
    quantized = int4 or int8
    tensors = _plain_tensors(model, tuple(n + "." for n in quantized))
    group = next(iter(quantized.values())).group_size
    for name, module in quantized.items():
        if module.bias is not None:
            tensors[name + ".bias"] = module.bias.detach().cpu().to(torch.float16 if int4 else RELEASE_DTYPE)
        if int4:
            tensors.update(_awq_tensors(name, module))
        else:
            tensors[name + ".qweight"] = module.codes().cpu().contiguous()
            tensors[name + ".scales"] = module.group_scales().detach().cpu().float().t().contiguous()
    if int4:
        config = _config_dict(model, {"awq_packing": {"bits": 4, "group_size": group, "zero_point": 8, "version": "gemm"}})
        spec = {AWQ_MODULES_FILE: {"bits": 4, "group_size": group, "modules": list(quantized)}}
    else:
        config = _config_dict(model, {"int8_packing": {"bits": 8, "group_size": group, "symmetric": True}})
        spec = {INT8_MODULES_FILE: {"bits": 8, "group_size": group, "format": "grace-int8",
                                    "scale_dtype": "float32", "modules": list(quantized)}}
    return _write_folder(out_dir, model, processor, tensors, config, spec)


def _awq_tensors(name: str, module: Int4Linear) -> dict[str, torch.Tensor]:
    """AutoAWQ `WQLinear_GEMM.from_linear` tensors: qweight [in, out/8], qzeros [in/g, out/8], scales fp16 [in/g, out]."""
    sz = module.scales_zeros().detach().cpu().float()             # [in/g, out, 2]
    scales, offset = sz[..., 0], sz[..., 1]
    zeros = zero_points_from_offsets(scales, offset, 4)            # offset = (8 - zp) * s
    codes = module.codes().cpu()                                   # [out, in] in [0, 15]
    return {name + ".qweight": awq_pack.pack(codes.t().contiguous()),
            name + ".qzeros": awq_pack.pack(zeros.to(torch.int32)),
            name + ".scales": scales.half().contiguous()}


def _load_for_export(source, kind: str, vision_tower=None):
    from .load import LoadedModel, load

    loaded = source if isinstance(source, LoadedModel) else load(source, device="cpu", dtype=torch.float32,
                                                                 vision_tower=vision_tower)
    if loaded.kind != kind or not loaded.packed:
        raise GraceLoadError(f"{loaded.source} is a {loaded.kind} ({loaded.format}) checkpoint; this export needs {kind}")
    return loaded


def export_awq(source, out_dir, layout: str = "grace", vision_tower=None) -> Path:
    """GRACE QAT W4 release (folder, repo id or LoadedModel) -> AWQ INT4.
    layout "grace": the GRACE `-AWQ` release layout (for a LLaVA release, as the authors' deploy script
    writes it: original LLaVA names); "hf": the standard transformers AWQ layout (`quantization_config`),
    which vLLM and SGLang serve. Paths are loaded in fp32 so scales reach the fp16 AWQ tensors unrounded
    (bit-exact with AutoAWQ). vision_tower: for a LLaVA source, as in `grace.load`."""
    if layout not in ("grace", "hf"):
        raise ValueError(f"layout must be 'grace' or 'hf', not {layout!r}")
    loaded = _load_for_export(source, "int4", vision_tower)
    llava = loaded.model.config.model_type == "llava"
    if layout == "hf":
        if llava:
            from .llava.export import save_llava_hf_awq

            return save_llava_hf_awq(loaded, out_dir)
        from .export_hf_awq import save_hf_awq

        return save_hf_awq(loaded.model, loaded.processor, out_dir)
    if llava:
        from .llava.export import save_llava_awq

        return save_llava_awq(loaded, out_dir)
    return save_packed(loaded.model, loaded.processor, out_dir)


def export_int8(source, out_dir) -> Path:
    """GRACE QAT W8 release (folder, repo id or LoadedModel) -> packed INT8 format."""
    loaded = _load_for_export(source, "int8")
    return save_packed(loaded.model, loaded.processor, out_dir)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m grace export", description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=["awq", "int8"], help="awq: from a W4 release; int8: from a W8 release")
    parser.add_argument("source", help="QAT release folder or Hub repo id")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--layout", choices=["grace", "hf"], default="grace",
                        help="awq only: grace = the GRACE -AWQ release layout; hf = transformers' AWQ layout (vLLM, SGLang)")
    parser.add_argument("--vision-tower", help="LLaVA only: folder of the CLIP tower (offline / mirrors)")
    args = parser.parse_args(argv)
    if args.format == "awq":
        out = export_awq(args.source, args.out, layout=args.layout, vision_tower=args.vision_tower)
    else:
        out = export_int8(args.source, args.out)
    print(f"wrote {out}")
    return 0
