"""Training objectives, each a small class over the pure losses of grace.distill (as mdistiller's distillers):

    ce      L = CE                                                   (no teacher)
    kd      L = CE + beta_init * r_kd(t) * T^2 KL(teacher || student)          (plain KD, the baseline)
    grace   L = CE + beta_t * r_kd(t) * L_GDKD + omega * r_rcka(t) * L_RCKA

r(t) = min(1, t / warmup), t the optimizer steps completed. CE is on answer tokens only; L_GDKD is
the confidence-gated decoupled KD of the next-token distributions; L_RCKA = 1 - CKA of the image
tokens' similarity structure at one decoder layer; beta_t comes from the adaptive IB controller:
step t trains with beta_t, then the step's L_GDKD (averaged over its micro-batches and processes)
updates the controller, whose beta_{t+1} the next step uses. With controller_update =
"last_micro_batch" (the authors' code, and the qwen3vl-2b-paper preset) the update happens at the
last micro-batch of step t instead, which already trains with beta_{t+1}; the others use beta_t.

Every objective answers the same calls, so the loop knows none of this: `losses(student, batch, t)`
-> (terms, weights, stats, logits) for one micro-batch, `step_fields(t)` (the weights a step uses, for the
log), `end_step(micro_stats)` after the optimizer update, `attach()` for the hooks it needs during
the run, and `state_dict()` / `load_state_dict()` for checkpoints.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .. import distill
from ..data.conversations import IGNORE_INDEX
from ..llava.training import rcka_image_grid
from .config import TrainConfig


def ramp(step: int, warmup: int) -> float:
    """r(t) = min(1, t / warmup) with t the completed optimizer steps; 1 without warm-up."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


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


def resolve_layer(model, index: int) -> int:
    """A decoder layer index (negative: from the end) as a non-negative one, checked."""
    count = len(distill.decoder_layers(model))
    resolved = index + count if index < 0 else index
    if not 0 <= resolved < count:
        raise ValueError(f"rcka_layer {index} is outside the {count} decoder layers")
    return resolved


class CEObjective:
    """Cross-entropy on the answer tokens; the base every objective extends."""

    name, uses_teacher = "ce", False

    def __init__(self, config: TrainConfig, student_core, teacher=None, accelerator=None):
        self.config, self.student_core, self.teacher, self.accelerator = config, student_core, teacher, accelerator

    @contextlib.contextmanager
    def attach(self):
        yield self

    def losses(self, student, batch: dict, step: int, last: bool = True) -> tuple[dict, dict, dict, torch.Tensor]:
        """One micro-batch (`last`: the last of its accumulation cycle): the loss terms (tensors), their
        weights, raw statistics and the student's answer-row logits."""
        batch = dict(batch)
        labels = batch.pop("labels")
        keep, targets, sequence_labels = answer_rows(labels)
        inputs = dict(batch, logits_to_keep=keep, use_cache=False)
        logits = student(**inputs).logits                        # [N + 1, V]
        terms, weights = {"ce": distill.ce_loss(logits[:-1], targets)}, {"ce": 1.0}
        stats = {"tokens": int(targets.numel()), "input_tokens": int(batch["attention_mask"].sum())}
        self.distill(inputs, logits, targets, sequence_labels, step, last, terms, weights, stats)
        return terms, weights, stats, logits

    def distill(self, inputs, logits, targets, sequence_labels, step, last, terms, weights, stats) -> None:
        """Add the objective's own terms (none for CE)."""

    def teacher_logits(self, inputs) -> torch.Tensor:
        with torch.no_grad(), self.accelerator.autocast():
            return self.teacher(**inputs).logits

    def beta(self) -> float | None:
        return None

    def step_fields(self, step: int) -> dict:
        """The weights optimizer step `step` (0-based) trains with, as logged."""
        beta = self.beta()
        return {"beta": beta, "kd_weight": None if beta is None else beta * ramp(step, self.config.kd_warmup),
                "rcka_weight": None}

    def end_step(self, micro: list[dict]) -> dict:
        """After the optimizer update: adapt (the controller) and return the step's own log fields."""
        return {"gdkd": None, "ema": None, "tau": None}

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


class KDObjective(CEObjective):
    """CE + a fixed beta_init times plain KD at temperature T (no gate, no R-CKA, no controller)."""

    name, uses_teacher = "kd", True

    def distill(self, inputs, logits, targets, sequence_labels, step, last, terms, weights, stats) -> None:
        teacher = self.teacher_logits(inputs)
        terms["kd"] = distill.kd_loss(logits[:-1], teacher[:-1], self.config.temperature)
        weights["kd"] = self.config.beta_init * ramp(step, self.config.kd_warmup)

    def beta(self) -> float:
        return self.config.beta_init


class GraceObjective(CEObjective):
    """CE + beta_t * gated DKD + omega * R-CKA, beta_t steered by the adaptive IB controller."""

    name, uses_teacher = "grace", True

    def __init__(self, config: TrainConfig, student_core, teacher, accelerator=None):
        super().__init__(config, student_core, teacher, accelerator)
        self.controller = distill.AdaptiveIBController(config.tau, config.eta, config.beta_init, config.beta_min,
                                                       config.beta_max, config.ema_decay)
        self.image_token_id = student_core.config.image_token_id
        self.student_capture = self.teacher_capture = None
        self.cycle: list[float] = []            # L_GDKD of this accumulation cycle's micro-batches so far
        self.reduced: float | None = None       # their mean over the cycle and all processes, once taken
        self.used: dict = {}                    # beta and GDKD weight of the latest micro-batch

    def update_controller(self) -> None:
        """Feed the controller the cycle's mean L_GDKD (over micro-batches and processes: every process
        gets the same beta)."""
        self.reduced = distill.reduce_for_controller(self.cycle, self.accelerator)
        self.controller.update(self.reduced)

    @contextlib.contextmanager
    def attach(self):
        """Capture the R-CKA layer's output of student and teacher, through forward hooks (never
        output_hidden_states for all layers)."""
        layer = self.config.rcka_layer
        with distill.capture_layer_output(self.student_core, resolve_layer(self.student_core, layer)) as student, \
                distill.capture_layer_output(self.teacher, resolve_layer(self.teacher, layer)) as teacher:
            self.student_capture, self.teacher_capture = student, teacher
            try:
                yield self
            finally:
                self.student_capture = self.teacher_capture = None

    def distill(self, inputs, logits, targets, sequence_labels, step, last, terms, weights, stats) -> None:
        config = self.config
        teacher = self.teacher_logits(inputs)
        terms["gdkd"], gate = distill.gated_dkd_loss(logits[None], teacher[None], sequence_labels[None],
                                                     config.temperature, config.alpha, config.dkd_beta)
        stats.update({k: gate[k] for k in ("gate_mean", "gate_min", "gate_max")})
        self.cycle.append(terms["gdkd"].item())
        if last and config.controller_update == "last_micro_batch":
            self.update_controller()               # this micro-batch already trains with beta_{t+1}
        weights["gdkd"] = self.controller.beta * ramp(step, config.kd_warmup)
        self.used = {"beta": self.controller.beta, "kd_weight": weights["gdkd"]}
        grid, merge_size = rcka_image_grid(self.student_core, inputs)   # Qwen3-VL's grid, or LLaVA's fixed count
        terms["rcka"], rcka_stats = distill.rcka_loss(self.student_capture.output, self.teacher_capture.output,
                                                      inputs["input_ids"], grid, self.image_token_id, merge_size)
        stats["cka"] = rcka_stats["cka"]
        weights["rcka"] = config.omega * ramp(step, config.rcka_warmup)
        self.student_capture.output = self.teacher_capture.output = None      # free them before backward

    def beta(self) -> float:
        return self.controller.beta

    def step_fields(self, step: int) -> dict:
        return super().step_fields(step) | {"rcka_weight": self.config.omega * ramp(step, self.config.rcka_warmup)}

    def end_step(self, micro: list[dict]) -> dict:
        fields = {}
        if self.config.controller_update == "after_step":
            self.update_controller()            # beta_{t+1}: used by the next step
        else:
            fields = self.used                  # the last micro-batch trained with beta_{t+1}: log that one
        gdkd, self.cycle, self.reduced = self.reduced, [], None
        return fields | {"gdkd": gdkd, "ema": self.controller.ema, "tau": self.config.tau}

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.controller.load_state_dict(state)


OBJECTIVE_CLASSES = {cls.name: cls for cls in (CEObjective, KDObjective, GraceObjective)}


def build_objective(config: TrainConfig, student_core, teacher=None, accelerator=None) -> CEObjective:
    cls = OBJECTIVE_CLASSES[config.resolved_objective]
    if cls.uses_teacher and teacher is None:
        raise ValueError(f"objective {cls.name} needs a teacher")
    return cls(config, student_core, teacher, accelerator)


def micro_step(objective: CEObjective, student, batch: dict, step: int, last: bool = True
               ) -> tuple[torch.Tensor, dict]:
    """Forward one micro-batch; return (weighted loss for backward, raw values for the metrics).
    A term that comes out NaN / Inf sits out (counted in `nonfinite`); the others still train."""
    terms, weights, stats, logits = objective.losses(student, batch, step, last)
    loss, nonfinite = None, 0
    for name, value in terms.items():
        stats[name] = value.item()
        if not math.isfinite(stats[name]):
            nonfinite += 1
        elif weights[name] != 0.0:
            loss = weights[name] * value if loss is None else loss + weights[name] * value
    if loss is None:                             # every term non-finite: zero gradients, backward still runs
        loss = logits.float().nan_to_num().sum() * 0.0
    stats["loss"], stats["nonfinite"] = loss.item(), nonfinite
    return loss, stats
