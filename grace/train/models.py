"""Student and teacher for a run: loading (the student as trainable fp32 QAT, the teacher frozen) and the
check that the two read the same token ids and pixels."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .config import TrainConfig


def load_student(config: TrainConfig, device: torch.device | str):
    """The student in fp32 (master weights; bf16 autocast on GPU), vision frozen, QAT applied.
    Returns (LoadedModel, QATConfig, names of the fake-quantized modules)."""
    from ..distill import QATConfig, apply_qat, freeze_vision
    from ..llava import training as arch   # what differs between Qwen3-VL and LLaVA-1.5
    from ..load import load

    loaded = load(config.student, device=device, dtype=torch.float32, packed=False, vision_tower=config.vision_tower)
    if loaded.quantized_modules:
        raise ValueError(f"student {config.student} is a packed {loaded.kind} ({loaded.format}) checkpoint, which "
                         "cannot be trained; start from a bf16 checkpoint or a GRACE QAT release")
    model = loaded.model
    if config.freeze_vision:
        freeze_vision(model, arch.vision_keyword(model))
        if config.train_merger:
            for name, param in model.named_parameters():
                if arch.projector_keyword(model) in name:   # visual.merger and the deepstack mergers; LLaVA's projector
                    param.requires_grad_(True)
    qat = QATConfig(bits=config.bits, group_size=config.group_size,
                    skip_keywords=arch.qat_skip_keywords(model, QATConfig.skip_keywords))
    qat_modules = apply_qat(model, qat)
    if loaded.format == "grace-qat":
        start_from_release_scales(model, loaded.path, qat)
    if config.gradient_checkpointing:     # transformers >= 5 calls it activation checkpointing
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_pixel_budget(loaded.processor, config.min_pixels, config.max_pixels)
    model.train()
    return loaded, qat, qat_modules


def set_pixel_budget(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Bound the pixels an image is resized to (Qwen-VL's min_pixels / max_pixels: `size`'s shortest_edge /
    longest_edge). The processor is saved with the release, so it keeps the budget it was trained with."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = processor.image_processor
    size = dict(image_processor.size)
    size = {"shortest_edge": size.get("shortest_edge"), "longest_edge": size.get("longest_edge")}
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    image_processor.size = size


@torch.no_grad()
def start_from_release_scales(model, folder: Path, qat) -> None:
    """A GRACE QAT release as student: continue from its learned step sizes (the sidecar's log_scale)
    rather than a fresh search, which would move its weights off the released codes."""
    from ..distill.fake_quant import fake_quant_modules
    from ..checkpoint_files import read_config, read_sidecar
    from ..formats import QAT_SIDECAR

    released = read_config(folder)["qat"]
    if (int(released.get("bits", 0)), int(released.get("group_size", 0))) != (qat.bits, qat.group_size):
        print(f"student {folder} was released with {released.get('bits')} bits, group {released.get('group_size')}; "
              f"training {qat.bits} bits, group {qat.group_size} starts from fresh step sizes", file=sys.stderr)
        return
    from ..llava.training import release_name

    sidecar = read_sidecar(folder / QAT_SIDECAR) if (folder / QAT_SIDECAR).is_file() else {}
    for name, module in fake_quant_modules(model).items():
        log_scale = sidecar.get(release_name(model, name) + ".log_scale")
        if log_scale is not None:
            module.log_scale.copy_(log_scale.reshape(module.log_scale.shape))


def load_teacher(config: TrainConfig, device: torch.device | str):
    """The teacher: frozen, in eval mode, bf16 on GPU (fp32 on CPU); never given to the optimizer."""
    from ..load import load

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    loaded = load(config.teacher, device=device, dtype=dtype, vision_tower=config.vision_tower)
    loaded.model.eval().requires_grad_(False)
    return loaded


def check_compatible(teacher, student) -> None:
    """Teacher and student must read the same token ids and pixels: same vocabulary, image token, patching."""
    t_tok, s_tok = teacher.processor.tokenizer, student.processor.tokenizer
    t_cfg, s_cfg = teacher.model.config, student.model.config
    problems = []
    if t_tok.get_vocab() != s_tok.get_vocab():
        t_vocab, s_vocab = t_tok.get_vocab(), s_tok.get_vocab()
        differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=str)[:3]
        problems.append(f"the tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens; e.g. {differ})")
    if t_cfg.text_config.vocab_size != s_cfg.text_config.vocab_size:
        problems.append(f"vocab_size {t_cfg.text_config.vocab_size} (teacher) vs {s_cfg.text_config.vocab_size}")
    if t_cfg.image_token_id != s_cfg.image_token_id:
        problems.append(f"image_token_id {t_cfg.image_token_id} (teacher) vs {s_cfg.image_token_id}")
    for key in ("patch_size", "temporal_patch_size", "spatial_merge_size"):
        t_val, s_val = getattr(t_cfg.vision_config, key, None), getattr(s_cfg.vision_config, key, None)
        if t_val != s_val:
            problems.append(f"vision {key} {t_val} (teacher) vs {s_val}")
    if problems:
        raise ValueError(f"teacher {teacher.source} and student {student.source} cannot be distilled into each "
                         "other: " + "; ".join(problems))


def export_release(student, processor, qat_config, bits: int, out: Path) -> dict:
    """final/ (the GRACE QAT release, or plain bf16 for 16 bits) and the packed export of 4 / 8 bits."""
    from ..export import export_awq, export_int8, save_plain, save_qat_release
    from .metrics import EXPORT_DIRS, FINAL_DIR

    if student.config.model_type == "llava":
        return _export_llava_release(student, processor, qat_config, bits, out)
    if bits == 16:
        return {"final": save_plain(student, processor, out / FINAL_DIR)}
    final = save_qat_release(student, processor, out / FINAL_DIR, qat_config)
    if bits not in EXPORT_DIRS:          # 2- and 3-bit sweeps: the QAT release (its grid as weights) only
        return {"final": final}
    exporter = export_awq if bits == 4 else export_int8
    return {"final": final, "export": exporter(final, out / EXPORT_DIRS[bits])}


def _export_llava_release(student, processor, qat_config, bits: int, out: Path) -> dict:
    """A LLaVA student: final/ in the GRACE LLaVA QAT release layout, export-awq/ as the LLaVA AWQ release."""
    from ..export import export_awq
    from ..llava.export import save_llava_qat_release
    from .metrics import EXPORT_DIRS, FINAL_DIR

    if bits != 4:
        raise ValueError(f"LLaVA students are released at 4 bits (the GRACE LLaVA layouts); got bits={bits}")
    final = save_llava_qat_release(student, processor, out / FINAL_DIR, qat_config)
    tower = getattr(student.config, "vision_tower_path", None)
    return {"final": final, "export": export_awq(final, out / EXPORT_DIRS[bits], vision_tower=tower)}
