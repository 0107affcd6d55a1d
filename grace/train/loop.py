"""The training loop: a quantization-aware student distilled from a frozen teacher, whatever the objective.

At every optimizer step t: grad_accum micro-batches (objective.losses -> weighted sum -> backward),
gradient clip, AdamW update (skipped when the gradient norm is not finite), the learning-rate
schedule, then objective.end_step (GRACE: the IB controller's update, used from step t + 1), one
metrics line, and a checkpoint when one is due (every `checkpoint_every` steps, every
`checkpoint_minutes`, at a stop request and at the end). A finished run writes final/ and the
packed export. A failure writes an end line (outcome failed, the error as a sentence), checkpoints
the last completed step when that is safe, and re-raises.

Memory: logits are computed only where an answer token is predicted (`logits_to_keep`), and hidden
states only at the R-CKA layer, through forward hooks.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .checkpoint import Checkpointer, CheckpointError, CheckpointTimer, find_checkpoint, rng_state
from .config import RESUME_MAY_CHANGE, TrainConfig, TrainResult
from .control import StopRequest, clear_stop_file
from .deepspeed_zero import NO_DEEPSPEED_ON_CPU, configure_deepspeed, deepspeed_requested, uses_deepspeed
from .metrics import METRICS_FILE, MetricsWriter, progress_line, read_metrics, summarize
from .models import check_compatible, export_release, load_student, load_teacher
from .objectives import build_objective, micro_step
from .sampler import build_dataset, build_loader


def cosine_schedule(optimizer, warmup: int, total: int, floor: float):
    """transformers' cosine-with-floor schedule, taken one step ahead so the first step already moves:
    optimizer step s (0-based) uses (s + 1) / warmup during warm-up, reaches the peak at the last
    warm-up step and decays by cosine to `floor` x peak at the last step (total - 1)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=floor, last_epoch=0)


class Trainer:
    """The state of one run: models, optimizer, schedule, objective, data stream and step count.
    `train()` drives it; each method is one phase of the run."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator

        self.config = config
        self.resume_from = find_checkpoint(config.resume) if config.resume else None
        self.out = Path(config.out) if config.out else self.resume_from.parent
        self.cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=not self.cuda,
                                       mixed_precision="bf16" if self.cuda else "no",
                                       step_scheduler_with_optimizer=False)   # the schedule counts optimizer steps
        self.is_main = self.accelerator.is_main_process
        self.deepspeed = uses_deepspeed(self.accelerator)
        if self.deepspeed:
            configure_deepspeed(self.accelerator.state.deepspeed_plugin, config.max_grad_norm)
        elif deepspeed_requested() and self.is_main:
            print(NO_DEEPSPEED_ON_CPU.format(n=self.accelerator.num_processes), file=sys.stderr)
        self.earlier = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            clear_stop_file(self.out, "left by an earlier stop request")
            self.earlier = read_metrics(self.out / METRICS_FILE) if self.resume_from else None
        self.accelerator.wait_for_everyone()
        self.log = MetricsWriter(self.out / METRICS_FILE, self.is_main)
        self.config_logged = False
        self.outputs: dict = {"metrics": self.out / METRICS_FILE}
        self.step, self.saved_step, self.samples_seen = 0, None, 0
        self.consistent = True          # False only while the optimizer is changing the weights
        self.boundary_rng = None        # RNG states at the last step boundary (what a checkpoint stores)
        self.checkpointer = self.objective = None
        self.timer = CheckpointTimer(config.checkpoint_minutes)
        self.samples_per_step = config.batch_size * config.grad_accum * self.accelerator.num_processes

    def log_config(self, **more) -> None:
        acc = self.accelerator
        if self.earlier is not None and "start_step" in more:       # step lines past the checkpoint: redone
            more["discarded_steps"] = sum(s["step"] > more["start_step"] for s in self.earlier.steps)
        self.log.write("config", time=time.time(), **asdict(self.config),
                       objective_resolved=self.config.resolved_objective, out_resolved=str(self.out),
                       resumed_from=str(self.resume_from) if self.resume_from else None,
                       processes=acc.num_processes, device=str(acc.device), mixed_precision=acc.mixed_precision,
                       **more)
        self.config_logged = True

    def setup(self) -> None:
        """Load and check the models, build optimizer / schedule / objective / data, restore a checkpoint."""
        from accelerate.utils import set_seed

        from ..distill import qat_param_groups

        config, acc = self.config, self.accelerator
        set_seed(config.seed)
        student, self.qat_config, self.qat_modules = load_student(config, acc.device)
        teacher = load_teacher(config, acc.device) if config.resolved_objective != "ce" else None
        if teacher is not None:
            check_compatible(teacher, student)
        self.student_core, self.processor = student.model, student.processor
        self.teacher = teacher.model if teacher is not None else None
        self.trainable = [p for p in self.student_core.parameters() if p.requires_grad]

        groups = qat_param_groups(self.student_core, config.lr, config.scale_lr, config.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas)
        self.scheduler = cosine_schedule(self.optimizer, config.resolved_warmup_steps, config.steps,
                                         config.min_lr_ratio)
        self.objective = build_objective(config, self.student_core, self.teacher, acc)
        dataset = build_dataset(config.data, config.seed, config.image_size, config.image_root)
        self.data_size = len(dataset) if hasattr(dataset, "__len__") else None
        if self.resume_from is not None:
            self.restore(self.resume_from)
        loader = build_loader(dataset, self.processor, config.batch_size, config.seed, self.samples_seen,
                              config.max_length, config.num_workers, pin_memory=self.cuda)
        self.student, self.optimizer, loader, self.scheduler = acc.prepare(self.student_core, self.optimizer, loader,
                                                                           self.scheduler)
        self.data = iter(loader)
        self.checkpointer = Checkpointer(self.out, acc, config.keep_checkpoints, self.deepspeed)
        if self.deepspeed and self.resume_from is not None:
            self.checkpointer.load_engine(self.resume_from)
        self.boundary_rng = rng_state()

    def restore(self, path: Path) -> None:
        state = Checkpointer.load(path, self.student_core, self.optimizer, self.scheduler,
                                  self.accelerator.process_index, engine_state=not self.deepspeed)
        self.step = self.saved_step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.objective.load_state_dict(state.get("controller"))
        if state.get("processes") != self.accelerator.num_processes and self.is_main:
            print(f"resuming {state.get('processes')}-process training with {self.accelerator.num_processes}: the "
                  "data stream continues, but the global batch (and so the trajectory) changes", file=sys.stderr)
        changed = {k: (v, getattr(self.config, k)) for k, v in state["config"].items()
                   if k not in RESUME_MAY_CHANGE and getattr(self.config, k, v) != (tuple(v) if isinstance(v, list)
                                                                                     else v)}
        if changed and self.is_main:
            print(f"resuming with changed settings (saved -> now): {changed}", file=sys.stderr)

    def optimizer_step(self, stop_requested: bool) -> dict:
        """Accumulate grad_accum micro-batches, clip, update, step the schedule and the objective;
        return the metrics line of this step (with the stop / checkpoint flags agreed by all processes)."""
        from ..distill import mean_quant_scale

        config, acc = self.config, self.accelerator
        started = time.perf_counter()
        t = self.step                                   # optimizer steps done before this one
        weights = self.objective.step_fields(t)
        lr = self.scheduler.get_last_lr()[0]
        micro = []
        for i in range(config.grad_accum):
            with acc.accumulate(self.student):
                loss, stats = micro_step(self.objective, self.student, next(self.data), t,
                                         last=i == config.grad_accum - 1)
                acc.backward(loss)                      # accelerate divides by grad_accum
                micro.append(stats)
        if not acc.sync_gradients:
            raise RuntimeError("gradient accumulation is out of step with accelerate's counter")
        norm = acc.clip_grad_norm_(self.trainable, config.max_grad_norm or math.inf)
        grad_norm = math.nan if norm is None else float(norm)      # None: DeepSpeed before its first step
        self.consistent = False
        if math.isfinite(grad_norm):    # a non-finite gradient skips the update (DeepSpeed's engine decides itself)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.samples_seen += self.samples_per_step
        self.consistent = True
        adapted = weights | self.objective.end_step(micro)
        summary = summarize(micro, acc, {"stop": stop_requested, "checkpoint_due": self.timer.due()})
        self.boundary_rng = rng_state()
        seconds = time.perf_counter() - started
        return {"step": self.step, "time": time.time(), "max_steps": config.steps, "lr": lr,
                "loss": summary["loss"], "ce": summary["ce"], "gdkd": adapted["gdkd"], "kd": summary["kd"],
                "rcka": summary["rcka"], "cka": summary["cka"], "beta": adapted["beta"], "ema": adapted["ema"],
                "tau": adapted["tau"], "kd_weight": adapted["kd_weight"], "rcka_weight": adapted["rcka_weight"],
                "gate_mean": summary["gate_mean"], "gate_min": summary["gate_min"], "gate_max": summary["gate_max"],
                "grad_norm": grad_norm,
                "quant_scale": mean_quant_scale(self.student_core) if self.qat_modules else None,
                "tokens": summary["tokens"], "tokens_per_s": summary["input_tokens"] / seconds, "step_s": seconds,
                "nonfinite": summary["nonfinite"] + int(not math.isfinite(grad_norm)),
                "stop": summary["stop"], "checkpoint_due": summary["checkpoint_due"]}

    def trainer_state(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen,
                "processes": self.accelerator.num_processes, "config": asdict(self.config),
                "controller": self.objective.state_dict(),
                "data": {"source": self.config.data, "seed": self.config.seed, "size": self.data_size}}

    def save(self, sync: bool = True) -> Path:
        started = time.perf_counter()
        try:
            path = self.checkpointer.save(self.step, self.student_core, self.optimizer, self.scheduler,
                                          self.trainer_state(), self.boundary_rng, sync)
        except CheckpointError:
            self.saved_step = self.step         # nothing more to try for this step: do not retry on the way out
            raise
        seconds = time.perf_counter() - started
        self.timer.saved(seconds)
        self.outputs["checkpoint"], self.saved_step = path, self.step
        self.log.write("checkpoint", time=time.time(), step=self.step, path=path, seconds=seconds)
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
            if error:
                print(f"error: {error}", file=sys.stderr)

    def result(self, outcome: str, last: dict) -> TrainResult:
        o = self.outputs
        return TrainResult(outcome, self.step, self.out, o["metrics"], o.get("checkpoint"), o.get("final"),
                           o.get("export"), last)


def describe_error(err: BaseException) -> str:
    """The end line's error: our own errors (bad data, a failed checkpoint) are already sentences;
    others keep their type, which says more to whoever reads the log."""
    from ..data.conversations import DataError

    return str(err) if isinstance(err, (CheckpointError, DataError)) else f"{type(err).__name__}: {err}"


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training as configured; see the module docstring. On failure: the end line
    (outcome failed), a checkpoint when it is safe, then the exception is re-raised."""
    from tqdm.auto import tqdm

    trainer = Trainer(config)
    last: dict = {}
    try:
        trainer.setup()
        with trainer.objective.attach(), StopRequest(trainer.out) as stop_request:
            core = trainer.student_core
            trainer.log_config(
                start_step=trainer.step, qat_modules=len(trainer.qat_modules),
                trainable_parameters=sum(p.numel() for p in trainer.trainable),
                student_parameters=sum(p.numel() for p in core.parameters()),
                teacher_parameters=sum(p.numel() for p in trainer.teacher.parameters()) if trainer.teacher else None)
            progress = tqdm(total=config.steps, initial=trainer.step, disable=not trainer.is_main, desc="train",
                            dynamic_ncols=True)
            started, first_step = time.perf_counter(), trainer.step
            while trainer.step < config.steps:
                last = trainer.optimizer_step(stop_request.requested())
                stop = last.pop("stop") or (config.stop_after is not None and trainer.step >= config.stop_after)
                due = last.pop("checkpoint_due") or trainer.step % config.checkpoint_every == 0
                last["eta_s"] = (time.perf_counter() - started) / (trainer.step - first_step) * (config.steps
                                                                                                  - trainer.step)
                trainer.log.write("step", **last)
                show_progress(progress, last, config, trainer.is_main)
                if due or trainer.step == config.steps or stop:
                    trainer.save()
                if stop and trainer.step < config.steps:
                    progress.close()
                    reason = stop_request.reason if stop_request.requested() else f"stop_after={config.stop_after}"
                    if trainer.is_main:
                        clear_stop_file(trainer.out)    # consumed: the resumed run should not stop at once
                    trainer.end("stopped", reason=reason)
                    return trainer.result("stopped", last)
            progress.close()
        if trainer.saved_step != trainer.step:
            trainer.save()
        trainer.export()
        trainer.end("finished")
        return trainer.result("finished", last)
    except BaseException as err:
        trainer.save_after_failure()
        trainer.end("failed", error=describe_error(err))
        raise
    finally:
        trainer.log.close()


def show_progress(progress, line: dict, config: TrainConfig, is_main: bool) -> None:
    progress.update(1)
    progress.set_postfix({k: f"{line[k]:.3g}" if isinstance(line[k], float) else "-"
                          for k in ("loss", "ce", "beta", "cka")}, refresh=False)
    if is_main and (line["step"] % config.log_every == 0 or line["step"] == config.steps):
        progress.write(progress_line(line))
