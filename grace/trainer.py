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
boundary with a checkpoint; resuming it continues the same trajectory (a resumed run appends a new
config line, its steps and its own end line to metrics.jsonl).

Memory: logits are computed only where an answer token is predicted (`logits_to_keep`), and hidden
states only at the R-CKA layer, through forward hooks (never output_hidden_states for all layers).
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
                    generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                    order = torch.randperm(self.size, generator=generator)
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
    if config.freeze_vision:
        freeze_vision(model)
    qat = QATConfig(bits=config.bits, group_size=config.group_size)
    qat_modules = apply_qat(model, qat)
    if loaded.format == "grace-qat":
        start_from_release_scales(model, loaded.path, qat)
    model.train()
    return loaded, qat, qat_modules


@torch.no_grad()
def start_from_release_scales(model, folder: Path, qat) -> None:
    """A GRACE QAT release as student: continue from its learned step sizes (the sidecar's log_scale)
    rather than a fresh search, which would move its weights off the released codes."""
    from .distill.fake_quant import fake_quant_modules
    from .checkpoint_files import read_config, read_sidecar
    from .formats import QAT_SIDECAR

    released = read_config(folder)["qat"]
    if (int(released.get("bits", 0)), int(released.get("group_size", 0))) != (qat.bits, qat.group_size):
        print(f"student {folder} was released with {released.get('bits')} bits, group {released.get('group_size')}; "
              f"training {qat.bits} bits, group {qat.group_size} starts from fresh step sizes", file=sys.stderr)
        return
    sidecar = read_sidecar(folder / QAT_SIDECAR) if (folder / QAT_SIDECAR).is_file() else {}
    for name, module in fake_quant_modules(model).items():
        log_scale = sidecar.get(name + ".log_scale")
        if log_scale is not None:
            module.log_scale.copy_(log_scale.reshape(module.log_scale.shape))


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
    """Plain KD: T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), mean over rows (zero without rows)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return kl.sum() / max(1, kl.numel()) * temperature ** 2


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

class Trainer:
    """The state of one run: models, optimizer, schedule, controller, data stream and step count.
    `train()` drives it; each method is one phase of the run."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator

        self.config, self.objective = config, config.resolved_objective
        self.resume_from = find_checkpoint(config.resume) if config.resume else None
        self.out = Path(config.out) if config.out else self.resume_from.parent
        self.cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=not self.cuda,
                                       mixed_precision="bf16" if self.cuda else "no",
                                       step_scheduler_with_optimizer=False)   # the schedule counts optimizer steps
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if (self.out / STOP_FILE).exists():
                print(f"removing a stale {self.out / STOP_FILE} from an earlier stop request", file=sys.stderr)
                (self.out / STOP_FILE).unlink()
        self.accelerator.wait_for_everyone()
        self.log = MetricsLog(self.out / METRICS_FILE, self.is_main)
        self.config_logged = False
        self.outputs: dict = {"metrics": self.out / METRICS_FILE}
        self.step, self.saved_step, self.samples_seen = 0, None, 0
        self.consistent = True          # False only while the optimizer is changing the weights
        self.boundary_rng = None        # RNG states at the last step boundary (what a checkpoint stores)
        self.checkpointer = self.controller = None
        self.samples_per_step = config.batch_size * config.grad_accum * self.accelerator.num_processes

    def log_config(self, **more) -> None:
        acc = self.accelerator
        self.log.write("config", time=time.time(), **asdict(self.config), objective_resolved=self.objective,
                       out_resolved=str(self.out), resumed_from=str(self.resume_from) if self.resume_from else None,
                       processes=acc.num_processes, device=str(acc.device), mixed_precision=acc.mixed_precision,
                       **more)
        self.config_logged = True

    def setup(self) -> None:
        """Load and check the models, build optimizer / schedule / controller / data, restore a checkpoint."""
        from accelerate.utils import set_seed

        from .data.conversations import Collator
        from .distill import AdaptiveIBController, qat_param_groups

        config, acc = self.config, self.accelerator
        set_seed(config.seed)
        student, self.qat_config, self.qat_modules = load_student(config, acc.device)
        teacher = load_teacher(config, acc.device) if self.objective != "ce" else None
        if teacher is not None:
            check_compatible(teacher, student)
        self.student_core, self.processor = student.model, student.processor
        self.teacher = teacher.model if teacher is not None else None
        self.trainable = [p for p in self.student_core.parameters() if p.requires_grad]

        groups = qat_param_groups(self.student_core, config.lr, config.scale_lr, config.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_factor, warmup=config.warmup_steps, total=config.steps, floor=config.min_lr_ratio))
        if self.objective == "grace":
            self.controller = AdaptiveIBController(config.tau, config.eta, config.beta_init, config.beta_min,
                                                   config.beta_max, config.ema_decay)
        dataset = build_dataset(config)
        self.data_size = len(dataset) if hasattr(dataset, "__len__") else None
        if self.resume_from is not None:
            self.restore(self.resume_from)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=config.batch_size, num_workers=config.num_workers, pin_memory=self.cuda,
            sampler=ResumableSampler(self.data_size, config.seed, self.samples_seen),
            collate_fn=Collator(self.processor, config.max_length))
        self.student, self.optimizer, loader, self.scheduler = acc.prepare(self.student_core, self.optimizer, loader,
                                                                           self.scheduler)
        self.data = iter(loader)
        self.checkpointer = Checkpointer(self.out, acc, config.keep_checkpoints)
        self.boundary_rng = rng_state()

    def restore(self, path: Path) -> None:
        state = Checkpointer.load(path, self.student_core, self.optimizer, self.scheduler,
                                  self.accelerator.process_index)
        self.step = self.saved_step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        if self.controller is not None and state.get("controller"):
            self.controller.load_state_dict(state["controller"])
        if state.get("processes") != self.accelerator.num_processes and self.is_main:
            print(f"resuming {state.get('processes')}-process training with {self.accelerator.num_processes}: the "
                  "data stream continues, but the global batch (and so the trajectory) changes", file=sys.stderr)
        ignored = ("resume", "stop_after", "out", "steps", "checkpoint_every", "log_every", "keep_checkpoints",
                   "num_workers")
        changed = {k: (v, getattr(self.config, k)) for k, v in state["config"].items()
                   if k not in ignored and getattr(self.config, k, v) != (tuple(v) if isinstance(v, list) else v)}
        if changed and self.is_main:
            print(f"resuming with changed settings (saved -> now): {changed}", file=sys.stderr)

    @contextlib.contextmanager
    def rcka_hooks(self):
        """Capture the R-CKA layer's output of student and teacher (GRACE only) for the whole run."""
        from .distill import capture_layer_output

        if self.objective != "grace":
            yield None, None
            return
        layer = self.config.rcka_layer
        with capture_layer_output(self.student_core, resolve_layer(self.student_core, layer)) as student, \
                capture_layer_output(self.teacher, resolve_layer(self.teacher, layer)) as teacher:
            yield student, teacher

    def optimizer_step(self, run: Run, stop_requested: bool) -> dict:
        """Accumulate grad_accum micro-batches, clip, update, step the schedule and the controller;
        return the metrics line of this step."""
        from .distill import mean_quant_scale, reduce_for_controller

        config, acc, controller = self.config, self.accelerator, self.controller
        started = time.perf_counter()
        t = self.step                                   # optimizer steps done before this one
        beta = controller.beta if controller else (config.beta_init if self.objective == "kd" else None)
        lr = self.scheduler.get_last_lr()[0]
        micro = []
        for _ in range(config.grad_accum):
            with acc.accumulate(self.student):
                loss, stats = micro_step(next(self.data), run, beta or 0.0, t)
                acc.backward(loss)                      # accelerate divides by grad_accum
                micro.append(stats)
        if not acc.sync_gradients:
            raise RuntimeError("gradient accumulation is out of step with accelerate's counter")
        grad_norm = float(acc.clip_grad_norm_(self.trainable, config.max_grad_norm or math.inf))
        self.consistent = False
        if math.isfinite(grad_norm):                    # a non-finite gradient skips the update
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.samples_seen += self.samples_per_step
        self.consistent = True
        gdkd = reduce_for_controller([m["gdkd"] for m in micro], acc) if controller else None
        if controller:
            controller.update(gdkd)                     # beta_{t+1}: used by the next step
        summary = summarize(micro, acc, stop_requested)
        self.boundary_rng = rng_state()
        seconds = time.perf_counter() - started
        return {"step": self.step, "time": time.time(), "max_steps": config.steps, "lr": lr,
                "loss": summary["loss"], "ce": summary["ce"], "gdkd": gdkd if controller else None,
                "kd": summary["kd"], "rcka": summary["rcka"], "cka": summary["cka"],
                "beta": beta, "ema": controller.ema if controller else None, "tau": config.tau if controller else None,
                "kd_weight": None if beta is None else beta * ramp(t, config.kd_warmup),
                "rcka_weight": config.omega * ramp(t, config.rcka_warmup) if self.objective == "grace" else None,
                "gate_mean": summary["gate_mean"], "gate_min": summary["gate_min"], "gate_max": summary["gate_max"],
                "grad_norm": grad_norm,
                "quant_scale": mean_quant_scale(self.student_core) if self.qat_modules else None,
                "tokens": summary["tokens"], "tokens_per_s": summary["input_tokens"] / seconds, "step_s": seconds,
                "nonfinite": summary["nonfinite"] + int(not math.isfinite(grad_norm)), "stop": summary["stop"]}

    def trainer_state(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen,
                "processes": self.accelerator.num_processes, "config": asdict(self.config),
                "controller": self.controller.state_dict() if self.controller else None,
                "data": {"source": self.config.data, "seed": self.config.seed, "size": self.data_size}}

    def save(self, sync: bool = True) -> Path:
        path = self.checkpointer.save(self.step, self.student_core, self.optimizer, self.scheduler,
                                      self.trainer_state(), self.boundary_rng, sync)
        self.outputs["checkpoint"], self.saved_step = path, self.step
        return path

    def save_after_failure(self) -> None:
        """Checkpoint the last completed step when that is safe: weights not mid-update, one process
        (with several, the others may be waiting in a collective that never comes)."""
        if (self.checkpointer is None or not self.consistent or self.step == 0 or self.saved_step == self.step
                or self.accelerator.num_processes > 1):
            return
        try:
            self.save(sync=False)
        except Exception as err:  # the original error matters more
            print(f"could not save a checkpoint after the failure: {err}", file=sys.stderr)

    def export(self) -> None:
        if self.is_main:
            self.outputs.update(export_release(self.student_core, self.processor, self.qat_config, self.config.bits,
                                               self.out))
        self.accelerator.wait_for_everyone()

    def end(self, outcome: str, error: str | None = None, **more) -> None:
        if not self.config_logged:
            self.log_config()
        self.log.write("end", time=time.time(), outcome=outcome, step=self.step, error=error, outputs=self.outputs,
                       **more)
        if self.is_main:
            where = self.outputs.get("export") or self.outputs.get("final") or self.outputs.get("checkpoint")
            print(f"{outcome} at step {self.step}; metrics in {self.outputs['metrics']}"
                  + (f"; model in {where}" if where else ""), file=sys.stderr)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring. On failure: the end line
    (outcome failed), a checkpoint when it is safe, then the exception is re-raised."""
    from tqdm.auto import tqdm

    trainer = Trainer(config)
    last: dict = {}
    try:
        trainer.setup()
        with trainer.rcka_hooks() as (student_capture, teacher_capture), StopRequest(trainer.out) as stop_request:
            core = trainer.student_core
            run = Run(config, trainer.objective, trainer.accelerator, trainer.student, trainer.teacher,
                      core.config.image_token_id, core.config.vision_config.spatial_merge_size,
                      student_capture, teacher_capture)
            trainer.log_config(
                start_step=trainer.step, qat_modules=len(trainer.qat_modules),
                trainable_parameters=sum(p.numel() for p in trainer.trainable),
                student_parameters=sum(p.numel() for p in core.parameters()),
                teacher_parameters=sum(p.numel() for p in trainer.teacher.parameters()) if trainer.teacher else None)
            progress = tqdm(total=config.steps, initial=trainer.step, disable=not trainer.is_main, desc="train",
                            dynamic_ncols=True)
            started, first_step = time.perf_counter(), trainer.step
            while trainer.step < config.steps:
                last = trainer.optimizer_step(run, stop_request.requested())
                stop = last.pop("stop") or (config.stop_after is not None and trainer.step >= config.stop_after)
                done = trainer.step - first_step
                last["eta_s"] = (time.perf_counter() - started) / done * (config.steps - trainer.step)
                trainer.log.write("step", **last)
                show_progress(progress, last, config, trainer.is_main)
                if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps or stop:
                    trainer.save()
                if stop and trainer.step < config.steps:
                    progress.close()
                    if trainer.is_main and (trainer.out / STOP_FILE).exists():
                        (trainer.out / STOP_FILE).unlink()      # consumed: the resumed run should not stop at once
                    reason = stop_request.reason if stop_request.requested() else f"stop_after={config.stop_after}"
                    trainer.end("stopped", reason=reason)
                    return TrainResult("stopped", trainer.step, trainer.out, trainer.out / METRICS_FILE,
                                       trainer.outputs.get("checkpoint"), last=last)
            progress.close()
        if trainer.saved_step != trainer.step:
            trainer.save()
        trainer.export()
        trainer.end("finished")
        outputs = trainer.outputs
        return TrainResult("finished", trainer.step, trainer.out, outputs["metrics"], outputs.get("checkpoint"),
                           outputs.get("final"), outputs.get("export"), last)
    except BaseException as err:
        trainer.save_after_failure()
        trainer.end("failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        trainer.log.close()


def show_progress(progress, line: dict, config: TrainConfig, is_main: bool) -> None:
    progress.update(1)
    progress.set_postfix(loss=_fmt(line["loss"], 3), ce=_fmt(line["ce"], 3), beta=_fmt(line["beta"], 3),
                         cka=_fmt(line["cka"], 3), refresh=False)
    if is_main and (line["step"] % config.log_every == 0 or line["step"] == config.steps):
        progress.write(f"step {line['step']}/{config.steps}  loss {_fmt(line['loss'])}  ce {_fmt(line['ce'])}  "
                       f"gdkd {_fmt(line['gdkd'])}  cka {_fmt(line['cka'])}  beta {_fmt(line['beta'])}  "
                       f"lr {line['lr']:.3g}  {line['tokens_per_s']:.0f} tok/s  eta {_duration(line['eta_s'])}")


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
    """One --option per TrainConfig field. Defaults are SUPPRESSed: only the options given appear in
    the parsed namespace, so --resume can take the rest from the checkpoint's saved configuration."""
    parser = argparse.ArgumentParser(prog="python -m grace train", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        name, default = "--" + f.name.replace("_", "-"), f.default
        kwargs = dict(default=argparse.SUPPRESS, help=f"{f.metadata.get('help', '')} (default: {default})")
        if isinstance(default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, tuple):
            parser.add_argument(name, type=float, nargs=len(default), metavar="X", **kwargs)
        elif f.name == "bits":
            parser.add_argument(name, type=int, choices=(4, 8, 16), **kwargs)
        elif f.name == "objective":
            parser.add_argument(name, choices=OBJECTIVES, **kwargs)
        elif f.name in ("max_length", "stop_after"):
            parser.add_argument(name, type=int, **kwargs)
        else:
            parser.add_argument(name, type=str if default is None else type(default), **kwargs)
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
    train(config)    # prints where the results are; raises on failure
    return 0
