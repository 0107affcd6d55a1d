"""GRACE training: a quantization-aware student distilled from a frozen teacher.

    L = CE + beta_t * r_kd(t) * L_GDKD + omega * r_rcka(t) * L_RCKA,     r(t) = min(1, t / warmup)

CE is on answer tokens only; L_GDKD is the confidence-gated decoupled KD of the next-token
distributions (grace.distill.gated_dkd_loss); L_RCKA = 1 - CKA of the image tokens' similarity
structure at one decoder layer (grace.distill.rcka_loss); t counts completed optimizer steps.

beta comes from the adaptive IB controller, in this order at every optimizer step t:
  1. the step trains with beta_t (logged as `beta`);
  2. after the optimizer update, L_GDKD of step t, averaged over its accumulation micro-batches
     and all processes (the value logged as `gdkd`), goes to controller.update;
  3. the result, beta_{t+1}, applies to the next step (`ema` is logged after this update).
A loss term that comes out NaN/Inf is left out of that step's loss (counted in `nonfinite`); a
non-finite gradient norm skips the update. The controller skips a non-finite value itself.

Objectives: grace (above), kd (CE + beta_init * r_kd(t) * T^2 KL(teacher || student) at T: plain
KD, no gate / R-CKA / controller; the benchmark's baseline) and ce (no teacher: `--teacher none`).

    python -m grace train --teacher T --student S --bits 4 --steps 1000 --data shapes --out runs/w4
    accelerate launch -m grace train ...        # one process per GPU (bf16 autocast, DDP)
    python -m grace train --resume runs/w4      # continue from the run's latest checkpoint

The run folder gets metrics.jsonl (a config line, one line per optimizer step, an end line; flushed
as written), checkpoint-<step>/ (the last `keep_checkpoints`), and when the run finishes final/
(GRACE QAT release, or plain bf16 for 16 bits) plus export-awq/ (4 bits) or export-int8/ (8 bits).
A stop request (SIGTERM, SIGINT, or a file STOP in the run folder) ends the run at the next step
boundary with a checkpoint; resuming it continues the same trajectory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
OBJECTIVES = ("grace", "kd", "ce")
STOP_FILE = "STOP"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"


def opt(default, help: str):
    """A config field with its help text (shown by `python -m grace train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run depends on. `python -m grace train` exposes each field as --field-name."""

    student: str = opt("", "student checkpoint: any source grace.load reads (a QAT release loads unpacked)")
    teacher: str | None = opt(None, "teacher checkpoint (frozen), or none for CE only")
    out: str | None = opt(None, "run folder (default with --resume: the resumed run's folder)")
    data: str = opt("shapes", "'shapes' (endless synthetic stream) or a LLaVA/ShareGPT4V conversation JSON")
    bits: int = opt(4, "student weight bits: 4 or 8 (QAT, group-wise) or 16 (no quantization)")
    steps: int = opt(1000, "optimizer steps of the whole run")
    objective: str | None = opt(None, "grace | kd | ce (default: grace with a teacher, ce without)")
    # optimisation
    lr: float = opt(2e-5, "peak learning rate of the weights")
    scale_lr: float = opt(1e-4, "peak learning rate of the QAT step sizes (log_scale)")
    weight_decay: float = opt(0.0, "AdamW weight decay of weight matrices")
    adam_betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    warmup_steps: int = opt(20, "linear learning-rate warm-up steps, then cosine decay")
    min_lr_ratio: float = opt(0.1, "cosine floor, as a fraction of the peak learning rate")
    batch_size: int = opt(4, "samples per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient-norm clip (0: no clipping)")
    # quantization
    group_size: int = opt(128, "QAT group size (input columns per step size)")
    freeze_vision: bool = opt(True, "keep the vision tower frozen (and unquantized)")
    # distillation
    temperature: float = opt(2.0, "distillation temperature T")
    alpha: float = opt(1.0, "DKD weight of the target-class term (TCKD)")
    dkd_beta: float = opt(4.0, "DKD weight of the non-target term (NCKD)")
    omega: float = opt(1.0, "weight of the R-CKA term")
    rcka_layer: int = opt(-2, "decoder layer whose output R-CKA aligns (negative: from the end; -2 = penultimate)")
    kd_warmup: int = opt(50, "steps of the linear ramp of the GDKD (or KD) term")
    rcka_warmup: int = opt(100, "steps of the linear ramp of the R-CKA term")
    # adaptive IB controller (beta of the GDKD term)
    tau: float = opt(1.0, "target of the smoothed L_GDKD: beta grows while the EMA is above it")
    eta: float = opt(0.01, "controller gain: beta += eta * (ema - tau) per step")
    beta_init: float = opt(1.0, "initial beta (also the fixed KD weight of --objective kd)")
    beta_min: float = opt(0.0, "lower bound of beta")
    beta_max: float = opt(5.0, "upper bound of beta")
    ema_decay: float = opt(0.99, "EMA decay of the controller's L_GDKD average")
    # data
    image_size: int = opt(64, "shapes: generated image size (the processor resizes as it was configured)")
    image_root: str | None = opt(None, "conversation JSON: folder image paths are relative to (default: the JSON's)")
    max_length: int | None = opt(None, "drop tokens past this length (default: keep all)")
    num_workers: int = opt(0, "data-loading worker processes")
    # run
    seed: int = opt(0, "seed of initialisation and of the data stream")
    checkpoint_every: int = opt(500, "write checkpoint-<step>/ every this many steps (and at the end)")
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
        if self.bits not in (4, 8, 16):
            problems.append(f"bits must be 4, 8 or 16, got {self.bits}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective in ("grace", "kd") and self.teacher is None:
            problems.append(f"objective {self.objective} needs a teacher (or use --objective ce)")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                     "group_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "kd_warmup", "rcka_warmup", "num_workers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
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


# -- schedules ------------------------------------------------------------------------------------------

def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based): linear warm-up (the first step
    already moves), then cosine from 1 down to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ramp(step: int, warmup: int) -> float:
    """r(t) = min(1, t / warmup) with t the completed optimizer steps; 1 without warm-up."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


# -- data -----------------------------------------------------------------------------------------------

class ResumableSampler(torch.utils.data.Sampler):
    """Endless sample indices: position p of the stream is a pure function of (seed, p), so a run
    resumes by starting at the number of samples already consumed.

    Endless data (size None, the shapes stream): index = p, a fresh image each time.
    A dataset of `size` records: epoch e = p // size visits a permutation seeded by (seed, e).
    Under accelerate each process takes every num_processes-th batch of this one stream.
    """

    def __init__(self, size: int | None, seed: int, start: int = 0):
        self.size, self.seed, self.start = size, seed, start

    def __iter__(self):
        position, epoch, order = self.start, None, None
        while True:
            if self.size is None:
                yield position
            else:
                if position // self.size != epoch:
                    epoch = position // self.size
                    order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                yield int(order[position % self.size])
            position += 1


def build_dataset(config: TrainConfig):
    from .data.conversations import ConversationDataset
    from .data.shapes import ShapesStream

    if config.data == "shapes":
        return ShapesStream(seed=config.seed, image_size=config.image_size)
    path = Path(config.data)
    if path.suffix != ".json" or not path.is_file():
        raise ValueError(f"data must be 'shapes' or an existing conversation .json file, got {config.data!r}")
    return ConversationDataset(path, config.image_root)


# -- models ---------------------------------------------------------------------------------------------

def load_student(config: TrainConfig, device: torch.device):
    """The student in fp32 (master weights; bf16 autocast on GPU), vision frozen, QAT applied."""
    from . import load
    from .distill import QATConfig, apply_qat, freeze_vision

    loaded = load(config.student, device=device, dtype=torch.float32, packed=False)
    if loaded.quantized_modules:
        raise ValueError(f"student {config.student} is a packed {loaded.kind} ({loaded.format}) checkpoint, which "
                         "cannot be trained; start from a bf16 checkpoint or a GRACE QAT release")
    model = loaded.model
    model.config.use_cache = False
    if config.freeze_vision:
        freeze_vision(model)
    qat = QATConfig(bits=config.bits, group_size=config.group_size)
    qat_modules = apply_qat(model, qat)
    model.train()
    return loaded, qat, qat_modules


def load_teacher(config: TrainConfig, device: torch.device):
    """The teacher: frozen, in eval mode, bf16 on GPU (fp32 on CPU); never given to the optimizer."""
    from . import load

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = load(config.teacher, device=device, dtype=dtype)
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
        t_val, s_val = getattr(t_cfg.vision_config, key), getattr(s_cfg.vision_config, key)
        if t_val != s_val:
            problems.append(f"vision {key} {t_val} (teacher) vs {s_val}")
    if problems:
        raise ValueError(f"teacher {teacher.source} and student {student.source} cannot be distilled into each "
                         "other: " + "; ".join(problems))


def resolve_layer(model, index: int) -> int:
    from .distill import decoder_layers

    count = len(decoder_layers(model))
    resolved = index + count if index < 0 else index
    if not 0 <= resolved < count:
        raise ValueError(f"rcka_layer {index} is outside the {count} decoder layers")
    return resolved


# -- losses ---------------------------------------------------------------------------------------------

def answer_rows(labels: torch.Tensor):
    """Which logits the losses need (for `logits_to_keep`) and what they predict.

    keep [B, L] marks positions whose next token is an answer token, plus one position after the
    last of them: flattened, the kept rows form one sequence of N + 1 rows in which row i predicts
    sequence_labels[i + 1] (the layout gated_dkd_loss expects) and the extra row predicts nothing.
    Only those rows go through the vocabulary projection, never the prompt or image tokens.
    Returns (keep, targets [N], sequence_labels [N + 1]).
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    rows, cols = keep.nonzero(as_tuple=True)
    if rows.numel():
        keep[rows[-1], cols[-1] + 1] = True
    else:
        keep[0, 0] = True       # nothing to learn in this batch: one row keeps the graph (and DDP) going
    sequence_labels = torch.cat([targets.new_full((1,), IGNORE_INDEX), targets])
    return keep, targets, sequence_labels


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over the answer tokens (zero, still in the graph, when there are none)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(1, targets.numel())


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain KD: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), mean over rows."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1).mean() * temperature ** 2


def is_finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


# -- checkpoints ----------------------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def find_checkpoint(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = checkpoint_dirs(path) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"nothing to resume in {path}: no checkpoint-<step>/ with {STATE_FILE}")
    return found[-1]


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The saved TrainConfig fields of a run folder's latest checkpoint (or of a checkpoint folder)."""
    return json.loads((find_checkpoint(path) / STATE_FILE).read_text(encoding="utf-8"))["config"]


class Checkpointer:
    """checkpoint-<step>/: model.safetensors (student), optimizer.pt, scheduler.pt, trainer_state.json
    (step, data stream position, controller, config), rng_state_<rank>.pt. Written to a .partial
    folder and renamed, so a crash never leaves a half checkpoint; only the newest `keep` stay."""

    def __init__(self, run_dir: Path, accelerator, keep: int):
        self.run_dir, self.accelerator, self.keep = run_dir, accelerator, keep

    def save(self, step: int, student, optimizer, scheduler, state: dict, rng: dict, sync: bool = True) -> Path:
        from safetensors.torch import save_model

        acc, final = self.accelerator, self.run_dir / f"checkpoint-{step}"
        tmp = final.with_name(final.name + ".partial")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if sync:
            acc.wait_for_everyone()
        torch.save(rng, tmp / f"rng_state_{acc.process_index}.pt")
        if acc.is_main_process:
            save_model(student, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        if sync:
            acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoint_dirs(self.run_dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if sync:
            acc.wait_for_everyone()
        return final

    @staticmethod
    def load(path: Path, student, optimizer, scheduler, process_index: int) -> dict:
        """Restore student / optimizer / scheduler / this process's RNG; return trainer_state.json."""
        from safetensors.torch import load_model

        device = next(student.parameters()).device
        missing, unexpected = load_model(student, str(path / "model.safetensors"), strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match the student (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); were bits / group_size / student changed?")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
        rng_file = path / f"rng_state_{process_index}.pt"
        set_rng_state(torch.load(rng_file if rng_file.is_file() else path / "rng_state_0.pt", weights_only=True))
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


# -- run control and logging ----------------------------------------------------------------------------

class StopRequest:
    """Set by SIGTERM / SIGINT (a second SIGINT interrupts at once) or by a STOP file in the run folder."""

    def __init__(self, run_dir: Path):
        self.stop_file = run_dir / STOP_FILE
        self.signalled: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signals only reach the main thread
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame):
        self.signalled = signal.Signals(signum).name
        if signum == signal.SIGINT:     # a second Ctrl-C should not have to wait for the step to end
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
        print(f"\n{self.signalled}: stopping after this step (checkpoint first)", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return self.signalled is not None or self.stop_file.exists()

    @property
    def reason(self) -> str:
        return self.signalled or f"{self.stop_file} found"


def _json_value(value):
    """NaN / Inf become null: JSON has no such numbers, and the app parses every line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed at once (the app tails this file)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, event: str, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps(_json_value({"event": event, **fields})) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


# -- one optimizer step ---------------------------------------------------------------------------------

MEAN_KEYS = ("loss", "ce", "gdkd", "kd", "rcka", "cka", "gate_mean")


def micro_step(batch: dict, run: "Run", beta: float, step: int) -> tuple[torch.Tensor, dict]:
    """Forward one micro-batch; return (weighted loss for backward, raw values for the metrics)."""
    config, objective = run.config, run.objective
    labels = batch.pop("labels")
    keep, targets, sequence_labels = answer_rows(labels)
    inputs = dict(batch, logits_to_keep=keep, use_cache=False)
    student_logits = run.student(**inputs).logits               # [N + 1, V]
    terms = {"ce": cross_entropy(student_logits[:-1], targets)}
    stats = {"tokens": int(targets.numel()), "input_tokens": int(batch["attention_mask"].sum())}
    weights = {"ce": 1.0}
    if objective != "ce":
        with torch.no_grad(), run.accelerator.autocast():
            teacher_logits = run.teacher(**inputs).logits
        if objective == "kd":
            terms["kd"] = kd_loss(student_logits[:-1], teacher_logits[:-1], config.temperature)
            weights["kd"] = config.beta_init * ramp(step, config.kd_warmup)
        else:
            from .distill import gated_dkd_loss, rcka_loss

            terms["gdkd"], gate = gated_dkd_loss(student_logits[None], teacher_logits[None], sequence_labels[None],
                                                 config.temperature, config.alpha, config.dkd_beta)
            stats.update({k: gate[k] for k in ("gate_mean", "gate_min", "gate_max")})
            weights["gdkd"] = beta * ramp(step, config.kd_warmup)
            terms["rcka"], rcka_stats = rcka_loss(run.student_capture.output, run.teacher_capture.output,
                                                  batch["input_ids"], batch.get("image_grid_thw"),
                                                  run.image_token_id, run.merge_size)
            stats["cka"] = rcka_stats["cka"]
            weights["rcka"] = config.omega * ramp(step, config.rcka_warmup)
            run.student_capture.output = run.teacher_capture.output = None   # free them before backward
    loss, nonfinite = None, 0
    for name, value in terms.items():
        stats[name] = value.item()
        if not math.isfinite(stats[name]):
            nonfinite += 1                       # this term sits out the step
        elif weights[name] != 0.0:
            loss = weights[name] * value if loss is None else loss + weights[name] * value
    if loss is None:                             # every term non-finite: zero gradients, backward still runs
        loss = student_logits.float().nan_to_num().sum() * 0.0
    stats["loss"], stats["nonfinite"] = loss.item(), nonfinite
    return loss, stats


def summarize(micro: list[dict], accelerator, stop: bool) -> dict:
    """Means over micro-batches and processes (NaN in, NaN out), gate min / max, token counts."""
    row = []
    for key in MEAN_KEYS:
        values = [m[key] for m in micro if key in m]
        row += [sum(values), len(values)]
    gate_min = [m["gate_min"] for m in micro if "gate_min" in m]
    gate_max = [m["gate_max"] for m in micro if "gate_max" in m]
    row += [min(gate_min, default=math.inf) if all(map(math.isfinite, gate_min)) else math.nan,
            max(gate_max, default=-math.inf) if all(map(math.isfinite, gate_max)) else math.nan,
            sum(m["tokens"] for m in micro), sum(m["input_tokens"] for m in micro),
            sum(m["nonfinite"] for m in micro), float(stop)]
    local = torch.tensor(row, dtype=torch.float64, device=accelerator.device)
    table = accelerator.gather(local[None]) if accelerator.num_processes > 1 else local[None]
    total = table.sum(0).tolist()
    out = {}
    for i, key in enumerate(MEAN_KEYS):
        count = total[2 * i + 1]
        out[key] = total[2 * i] / count if count else None
    n = 2 * len(MEAN_KEYS)
    gate_min, gate_max = table[:, n].min().item(), table[:, n + 1].max().item()
    out["gate_min"] = gate_min if out["gate_mean"] is not None and math.isfinite(gate_min) else None
    out["gate_max"] = gate_max if out["gate_mean"] is not None and math.isfinite(gate_max) else None
    out["tokens"], out["input_tokens"], out["nonfinite"] = int(total[n + 2]), int(total[n + 3]), int(total[n + 4])
    out["stop"] = total[n + 5] > 0
    return out


@dataclass
class Run:
    """What one micro-step needs."""

    config: TrainConfig
    objective: str
    accelerator: object
    student: torch.nn.Module               # as prepared by accelerate (DDP-wrapped on several GPUs)
    teacher: torch.nn.Module | None
    image_token_id: int
    merge_size: int
    student_capture: object = None
    teacher_capture: object = None


# -- the training loop ----------------------------------------------------------------------------------

def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring. Raises on failure after
    writing the end line (outcome failed) and, when it can, a checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .distill import AdaptiveIBController, capture_layer_output, mean_quant_scale, qat_param_groups
    from .distill import reduce_for_controller

    resume_from = find_checkpoint(config.resume) if config.resume else None
    out = Path(config.out) if config.out else resume_from.parent
    objective = config.resolved_objective
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision="bf16" if cuda else "no",
                              step_scheduler_with_optimizer=False)   # the schedule counts optimizer steps
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if (out / STOP_FILE).exists():
            print(f"removing a stale {out / STOP_FILE} from an earlier stop request", file=sys.stderr)
            (out / STOP_FILE).unlink()
    accelerator.wait_for_everyone()
    log = MetricsLog(out / METRICS_FILE, main)
    log.write("config", time=time.time(), **asdict(config), objective_resolved=objective,
              out_resolved=str(out), resumed_from=str(resume_from) if resume_from else None,
              processes=accelerator.num_processes, device=str(accelerator.device),
              mixed_precision=accelerator.mixed_precision)

    step, saved_step, consistent = 0, None, True
    boundary_rng = None
    student = optimizer = scheduler = controller = checkpointer = None
    last: dict = {}
    outputs: dict = {"metrics": out / METRICS_FILE}

    def trainer_state() -> dict:
        return {"step": step, "samples_seen": samples_per_step * step, "processes": accelerator.num_processes,
                "controller": controller.state_dict() if controller else None, "config": asdict(config),
                "data": {"source": config.data, "seed": config.seed, "size": data_size}}

    def save(sync: bool = True) -> Path:
        nonlocal saved_step
        path = checkpointer.save(step, student_core, optimizer, scheduler, trainer_state(), boundary_rng, sync)
        saved_step = step
        outputs["checkpoint"] = path
        return path

    try:
        set_seed(config.seed)
        device = accelerator.device
        student_loaded, qat_config, qat_modules = load_student(config, device)
        teacher_loaded = load_teacher(config, device) if objective != "ce" else None
        if teacher_loaded is not None:
            check_compatible(teacher_loaded, student_loaded)
        student_core = student_loaded.model
        processor = student_loaded.processor

        groups = qat_param_groups(student_core, config.lr, config.scale_lr, config.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
            lr_factor, warmup=config.warmup_steps, total=config.steps, floor=config.min_lr_ratio))
        if objective == "grace":
            controller = AdaptiveIBController(config.tau, config.eta, config.beta_init, config.beta_min,
                                              config.beta_max, config.ema_decay)

        dataset = build_dataset(config)
        data_size = len(dataset) if hasattr(dataset, "__len__") else None
        samples_per_step = config.batch_size * config.grad_accum * accelerator.num_processes
        if resume_from is not None:
            state = Checkpointer.load(resume_from, student_core, optimizer, scheduler, accelerator.process_index)
            step = saved_step = int(state["step"])
            if controller is not None and state.get("controller"):
                controller.load_state_dict(state["controller"])
            changed = {k: (v, getattr(config, k)) for k, v in state["config"].items()
                       if k not in ("resume", "stop_after", "out", "steps", "checkpoint_every", "log_every",
                                    "keep_checkpoints", "num_workers") and getattr(config, k, v) != v}
            if changed and main:
                print(f"resuming with changed settings (saved -> now): {changed}", file=sys.stderr)
            start_sample = int(state["samples_seen"])
        else:
            start_sample = 0

        from .data.conversations import Collator

        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                                             sampler=ResumableSampler(data_size, config.seed, start_sample),
                                             collate_fn=Collator(processor, config.max_length), pin_memory=cuda)
        student, optimizer, loader, scheduler = accelerator.prepare(student_core, optimizer, loader, scheduler)
        checkpointer = Checkpointer(out, accelerator, config.keep_checkpoints)
        run = Run(config, objective, accelerator, student, teacher_loaded.model if teacher_loaded else None,
                  student_core.config.image_token_id, student_core.config.vision_config.spatial_merge_size)
        trainable = [p for p in student_core.parameters() if p.requires_grad]

        with contextlib.ExitStack() as stack:
            if objective == "grace":
                run.student_capture = stack.enter_context(capture_layer_output(
                    student_core, resolve_layer(student_core, config.rcka_layer)))
                run.teacher_capture = stack.enter_context(capture_layer_output(
                    run.teacher, resolve_layer(run.teacher, config.rcka_layer)))
            stop_request = stack.enter_context(StopRequest(out))
            log.write("start", time=time.time(), step=step, max_steps=config.steps, qat_modules=len(qat_modules),
                      trainable_parameters=sum(p.numel() for p in trainable),
                      student_parameters=sum(p.numel() for p in student_core.parameters()),
                      teacher_parameters=sum(p.numel() for p in run.teacher.parameters()) if run.teacher else None)
            progress = tqdm(total=config.steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
            data = iter(loader)
            started, steps_this_run = time.perf_counter(), 0
            stop = step >= config.steps
            while not stop:
                boundary_rng = rng_state()
                step_start = time.perf_counter()
                beta = controller.beta if controller else (config.beta_init if objective == "kd" else None)
                lr = scheduler.get_last_lr()[0]
                micro = []
                for _ in range(config.grad_accum):
                    batch = next(data)
                    with accelerator.accumulate(student):
                        loss, stats = micro_step(batch, run, beta if beta is not None else 0.0, step)
                        accelerator.backward(loss)
                        micro.append(stats)
                if not accelerator.sync_gradients:
                    raise RuntimeError("gradient accumulation is out of step with accelerate's counter")
                grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm if config.max_grad_norm > 0
                                                        else math.inf)
                grad_norm = float(grad_norm)
                consistent = False
                if math.isfinite(grad_norm):
                    optimizer.step()
                skipped_update = not math.isfinite(grad_norm)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                consistent = True
                gdkd = reduce_for_controller([m["gdkd"] for m in micro], accelerator) if controller else None
                if controller:
                    controller.update(gdkd)
                summary = summarize(micro, accelerator, stop_request.requested())
                elapsed = time.perf_counter() - step_start
                steps_this_run += 1
                eta = (time.perf_counter() - started) / steps_this_run * (config.steps - step)
                last = {"step": step, "time": time.time(), "max_steps": config.steps, "lr": lr,
                        "loss": summary["loss"], "ce": summary["ce"],
                        "gdkd": gdkd if controller else summary["gdkd"], "kd": summary["kd"],
                        "rcka": summary["rcka"], "cka": summary["cka"],
                        "beta": beta, "ema": controller.ema if controller else None,
                        "tau": config.tau if controller else None,
                        "kd_weight": None if beta is None else beta * ramp(step - 1, config.kd_warmup),
                        "rcka_weight": config.omega * ramp(step - 1, config.rcka_warmup) if objective == "grace" else None,
                        "gate_mean": summary["gate_mean"], "gate_min": summary["gate_min"],
                        "gate_max": summary["gate_max"], "grad_norm": grad_norm,
                        "quant_scale": mean_quant_scale(student_core) if qat_modules else None,
                        "tokens": summary["tokens"], "tokens_per_s": summary["input_tokens"] / elapsed,
                        "step_s": elapsed, "eta_s": eta,
                        "nonfinite": summary["nonfinite"] + int(skipped_update)}
                log.write("step", **last)
                progress.update(1)
                progress.set_postfix(loss=_fmt(last["loss"], 3), ce=_fmt(last["ce"], 3), beta=_fmt(beta, 3),
                                     cka=_fmt(last["cka"], 3), refresh=False)
                if main and (step % config.log_every == 0 or step == config.steps):
                    progress.write(f"step {step}/{config.steps}  loss {_fmt(last['loss'])}  ce {_fmt(last['ce'])}  "
                                   f"gdkd {_fmt(last['gdkd'])}  cka {_fmt(last['cka'])}  beta {_fmt(beta)}  "
                                   f"lr {lr:.3g}  {last['tokens_per_s']:.0f} tok/s  eta {_duration(eta)}")
                boundary_rng = rng_state()
                stop_now = summary["stop"] or (config.stop_after is not None and step >= config.stop_after)
                if step % config.checkpoint_every == 0 or step >= config.steps or stop_now:
                    save()
                if stop_now and step < config.steps:
                    progress.close()
                    reason = stop_request.reason if summary["stop"] else f"stop_after={config.stop_after}"
                    if main and (out / STOP_FILE).exists():
                        (out / STOP_FILE).unlink()      # consumed: a resumed run should not stop at once
                    log.write("end", time=time.time(), outcome="stopped", step=step, reason=reason, error=None,
                              outputs=outputs)
                    return TrainResult("stopped", step, out, out / METRICS_FILE, outputs.get("checkpoint"), last=last)
                stop = step >= config.steps
            progress.close()

        if saved_step != step:
            boundary_rng = rng_state()
            save()
        if main:
            outputs.update(export_release(student_core, processor, qat_config, config.bits, out))
        accelerator.wait_for_everyone()
        log.write("end", time=time.time(), outcome="finished", step=step, error=None, outputs=outputs)
        return TrainResult("finished", step, out, out / METRICS_FILE, outputs.get("checkpoint"), outputs.get("final"),
                           outputs.get("export"), last)
    except BaseException as err:
        # Save what can be saved: the last completed step (one process only: others may be stuck in a collective).
        if (checkpointer is not None and consistent and boundary_rng is not None and step > 0
                and saved_step != step and accelerator.num_processes == 1):
            try:
                save(sync=False)
            except Exception as save_err:  # the original error matters more
                print(f"could not save a checkpoint after the failure: {save_err}", file=sys.stderr)
        log.write("end", time=time.time(), outcome="failed", step=step, error=f"{type(err).__name__}: {err}",
                  outputs=outputs)
        raise
    finally:
        log.close()


def export_release(student, processor, qat_config, bits: int, out: Path) -> dict:
    """final/ (the GRACE QAT release, or plain bf16 for 16 bits) and the packed export of 4 / 8 bits."""
    from .export import export_awq, export_int8, save_plain, save_qat_release

    if bits == 16:
        return {"final": save_plain(student, processor, out / "final")}
    final = save_qat_release(student, processor, out / "final", qat_config)
    exporter, name = (export_awq, "export-awq") if bits == 4 else (export_int8, "export-int8")
    return {"final": final, "export": exporter(final, out / name)}


# -- command line ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grace train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig.__dataclass_fields__
    for f in dataclasses.fields(TrainConfig):
        name, default, help_text = "--" + f.name.replace("_", "-"), f.default, f.metadata.get("help", "")
        # SUPPRESS: only options given on the command line appear, so --resume can fill in the rest.
        kwargs = dict(default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
        if isinstance(default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, tuple):
            parser.add_argument(name, type=float, nargs=len(default), metavar="X", **kwargs)
        elif f.name == "bits":
            parser.add_argument(name, type=int, choices=(4, 8, 16), **kwargs)
        elif f.name == "objective":
            parser.add_argument(name, choices=OBJECTIVES, **kwargs)
        else:
            kind = type(default) if default is not None and not isinstance(default, str) else None
            if f.name in ("max_length", "stop_after"):
                kind = int
            parser.add_argument(name, type=kind or str, **kwargs)
    del defaults
    parser.formatter_class = argparse.HelpFormatter
    return parser


def config_from_args(argv: list[str]) -> TrainConfig:
    given = vars(build_parser().parse_args(argv))
    if given.get("resume"):
        saved = read_checkpoint_config(given["resume"])
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, "out": None, "stop_after": None,
                              **given})
    return TrainConfig(**given)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = train(config)
    where = result.export or result.final or result.checkpoint
    print(f"{result.outcome} at step {result.step}; metrics in {result.metrics}" + (f"; model in {where}" if where else ""))
    return 0
