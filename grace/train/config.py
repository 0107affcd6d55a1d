"""TrainConfig (everything a run depends on, and the one place its defaults live) and TrainResult."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

OBJECTIVES = ("grace", "kd", "ce")


def opt(default, help: str):
    """A config field with its help text (shown by `python -m grace train --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run depends on. `python -m grace train` exposes each field as --field-name."""

    student: str = field(metadata={"help": "student checkpoint: any source grace.load reads (a QAT release loads "
                                           "unpacked)"})
    teacher: str | None = opt(None, "teacher checkpoint (frozen), or none for CE only")
    vision_tower: str | None = opt(None, "LLaVA only: folder of the CLIP tower student and teacher name (offline, "
                                         "mirrors); else $GRACE_VISION_TOWER, else the Hub")
    out: str | None = opt(None, "run folder (default with --resume: the resumed run's folder)")
    data: str = opt("shapes", "'shapes' (endless synthetic stream) or a LLaVA/ShareGPT4V conversation JSON")
    bits: Literal[2, 3, 4, 8, 16] = opt(4, "student weight bits: 4 or 8 (QAT, group-wise; 2 and 3 for sweeps, codes in the 4-bit container, no packed export) or 16 (no quantization)")
    steps: int = opt(1000, "optimizer steps of the whole run")
    objective: Literal["grace", "kd", "ce"] | None = opt(None, "grace | kd | ce (default: grace with a teacher, "
                                                               "ce without)")
    # optimisation
    lr: float = opt(2e-5, "peak learning rate of the weights")
    scale_lr: float = opt(1e-4, "peak learning rate of the QAT step sizes (log_scale)")
    weight_decay: float = opt(0.0, "AdamW weight decay of weight matrices")
    adam_betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    warmup_steps: int = opt(20, "linear learning-rate warm-up steps, then cosine decay")
    warmup_ratio: float = opt(0.0, "warm-up as a fraction of steps, rounded up (used instead of warmup_steps "
                                   "when > 0)")
    min_lr_ratio: float = opt(0.1, "cosine floor, as a fraction of the peak learning rate")
    batch_size: int = opt(4, "samples per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient-norm clip (0: no clipping)")
    # quantization
    group_size: int = opt(128, "QAT group size (input columns per step size)")
    freeze_vision: bool = opt(True, "keep the vision tower frozen (and unquantized)")
    train_merger: bool = opt(False, "with freeze_vision: still train the vision-to-language merger (never "
                                    "quantized)")
    gradient_checkpointing: bool = opt(False, "recompute the student's activations in the backward pass (less "
                                              "memory, slower)")
    # distillation
    temperature: float = opt(2.0, "distillation temperature T")
    alpha: float = opt(1.0, "DKD weight of the target-class term (TCKD)")
    dkd_beta: float = opt(4.0, "DKD weight of the non-target term (NCKD)")
    omega: float = opt(1.0, "weight of the R-CKA term")
    rcka_layer: int = opt(-2, "decoder layer whose output R-CKA aligns (negative: from the end; -2 = penultimate)")
    kd_warmup: int = opt(50, "steps of the linear ramp of the GDKD (or KD) term")
    rcka_warmup: int = opt(100, "steps of the linear ramp of the R-CKA term")
    # Adaptive IB controller (beta weighs the GDKD term). tau is in L_GDKD's own units (T^2-scaled, dkd_beta=4):
    # measured at T=2 on the tiny models, ~28 for an untrained student vs a trained teacher, falling below 0.1
    # as it matches (~0.1 between two random models). tau=1 sits between: beta climbs (to beta_max) while the
    # student is far off and relaxes, at most eta per step, once the smoothed loss is under 1. beta starts at
    # 1 (KD as strong as CE), bounded to [0, 5]. For other temperatures / dkd_beta rescale tau alike.
    tau: float = opt(1.0, "target of the smoothed L_GDKD: beta grows while the EMA is above it")
    eta: float = opt(0.01, "controller gain: beta += eta * (ema - tau) per step")
    beta_init: float = opt(1.0, "initial beta (also the fixed KD weight of --objective kd)")
    beta_min: float = opt(0.0, "lower bound of beta")
    beta_max: float = opt(5.0, "upper bound of beta")
    ema_decay: float = opt(0.99, "EMA decay of the controller's L_GDKD average")
    controller_update: Literal["after_step", "last_micro_batch"] = opt(
        "after_step", "when a step's mean L_GDKD updates beta: after the optimizer step (the next step uses it) "
                      "or at the step's last micro-batch, which already uses it (the authors' code)")
    # data
    image_size: int = opt(64, "shapes: generated image size (the processor resizes as it was configured)")
    image_root: str | None = opt(None, "conversation JSON: folder image paths are relative to (default: the JSON's)")
    max_length: int | None = opt(None, "drop tokens past this length (default: keep all)")
    min_pixels: int | None = opt(None, "smallest pixel count an image is resized to (None: as the processor "
                                       "was saved)")
    max_pixels: int | None = opt(None, "largest pixel count an image is resized to (None: as the processor was "
                                       "saved)")
    num_workers: int = opt(0, "data-loading worker processes")
    # run
    seed: int = opt(0, "seed of initialisation and of the data stream")
    checkpoint_every: int = opt(500, "write checkpoint-<step>/ every this many steps (and at the end)")
    # By time as well: a killed job loses at most about this much work. A slow write stretches the interval
    # (see checkpoint.CheckpointTimer) so that checkpointing never takes more than ~10 % of the run.
    checkpoint_minutes: float = opt(1.0, "also checkpoint once this many minutes have passed since the last one "
                                         "(0: by steps only)")
    keep_checkpoints: int = opt(2, "checkpoints kept (older ones are deleted)")
    log_every: int = opt(10, "print a progress line every this many steps")
    resume: str | None = opt(None, "continue from a run folder (its latest checkpoint) or a checkpoint folder")
    stop_after: int | None = opt(None, "stop (as on a stop request) once this many steps are done")

    def __post_init__(self):
        if isinstance(self.teacher, str) and self.teacher.strip().lower() in ("", "none"):
            self.teacher = None
        self.adam_betas = tuple(self.adam_betas)
        problems = []
        if not self.student:
            problems.append("a student checkpoint is required")
        if self.bits not in (2, 3, 4, 8, 16):
            problems.append(f"bits must be 2, 3, 4, 8 or 16, got {self.bits}")
        if self.controller_update not in ("after_step", "last_micro_batch"):
            problems.append(f"controller_update must be after_step or last_micro_batch, got {self.controller_update!r}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective in ("grace", "kd") and self.teacher is None:
            problems.append(f"objective {self.objective} needs a teacher (or use --objective ce)")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                     "group_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "kd_warmup", "rcka_warmup", "num_workers", "checkpoint_minutes"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            problems.append(f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.temperature <= 0:
            problems.append(f"temperature must be positive, got {self.temperature}")
        if not self.beta_min <= self.beta_init <= self.beta_max:
            problems.append(f"need beta_min <= beta_init <= beta_max, got {self.beta_min}, {self.beta_init}, "
                            f"{self.beta_max}")
        if not self.out and not self.resume:
            problems.append("an output folder (out) is required")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    @property
    def resolved_objective(self) -> str:
        return self.objective or ("grace" if self.teacher else "ce")

    @property
    def resolved_warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.steps) if self.warmup_ratio > 0 else self.warmup_steps

    @classmethod
    def from_preset(cls, name: str, **fields) -> "TrainConfig":
        """A named recipe (PRESETS) with `fields` on top: TrainConfig.from_preset("qwen3vl-2b-paper",
        student=..., teacher=..., out=...)."""
        return cls(**{**preset_values(name), **fields})


# Named recipes: the values a published run used, each with its source. `--preset NAME` on the command
# line; every value can still be overridden by its own option.
PRESETS = {
    "qwen3vl-2b-paper": {
        "source": "the authors' Qwen3-VL-2B GRACE run: qwen-vl-finetune/scripts/finetune_qwen3vl_2b_grace.slurm "
                  "in github.com/ForeverBlue816/GRACE (8B teacher, 16 GPUs x 2 per device x 16 accumulation = "
                  "512 per step, DeepSpeed ZeRO-2, bf16; 1 epoch of ShareGPT4V mix665k, about 1 300 steps; the "
                  "paper trains 3 epochs). Several GPUs: accelerate launch --config_file "
                  "grace/train/accelerate_zero2.yaml",
        "values": dict(bits=4, group_size=128, lr=1e-5, scale_lr=2e-4, weight_decay=1e-3, warmup_ratio=0.03,
                       min_lr_ratio=0.0, max_grad_norm=1.0, batch_size=2, grad_accum=16, steps=1300,
                       temperature=2.0, alpha=1.0, dkd_beta=4.0, omega=3.0, rcka_layer=-2, kd_warmup=0,
                       rcka_warmup=400, tau=3.0, eta=0.003, beta_init=0.5, beta_min=0.1, beta_max=1.0,
                       ema_decay=0.99, controller_update="last_micro_batch", freeze_vision=True, train_merger=True,
                       gradient_checkpointing=True,
                       min_pixels=784, max_pixels=200_704, max_length=8192, num_workers=4, checkpoint_every=500,
                       keep_checkpoints=3),
    },
}


def preset_values(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return dict(PRESETS[name]["values"])


# Settings that may differ when a run is resumed without changing its trajectory.
RESUME_MAY_CHANGE = ("resume", "stop_after", "out", "steps", "checkpoint_every", "checkpoint_minutes", "log_every",
                     "keep_checkpoints", "num_workers")


@dataclass
class TrainResult:
    outcome: str                       # finished | stopped | failed
    step: int
    out: Path
    metrics: Path
    checkpoint: Path | None = None
    final: Path | None = None
    export: Path | None = None
    last: dict = field(default_factory=dict)      # the last step's metrics
