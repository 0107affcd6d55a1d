"""The objectives: which rows the losses see, the warm-up ramps, and one interface for CE, KD and GRACE."""

import math

import pytest
import torch
from accelerate import Accelerator

from grace.data.conversations import Collator
from grace.data.shapes import ShapesStream
from grace.distill import gated_dkd_loss, kd_loss
from grace.tiny import TinyConfig, tiny_qwen3vl
from grace.train.config import TrainConfig
from grace.train.objectives import (CEObjective, GraceObjective, KDObjective, answer_rows, build_objective,
                                    micro_step, ramp)


def test_answer_rows_feed_only_answer_logits():
    """The kept rows, flattened, read as one sequence: row i predicts sequence_labels[i + 1]; the gated DKD
    over them equals the gated DKD over the full logits."""
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    keep, targets, sequence = answer_rows(labels)
    assert keep.nonzero().tolist() == [[0, 1], [0, 2], [1, 0], [1, 1]]
    assert targets.tolist() == [5, 6, 7] and sequence.tolist() == [-100, 5, 6, 7]
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    full, _ = gated_dkd_loss(student, teacher, labels)
    kept, _ = gated_dkd_loss(student[keep][None], teacher[keep][None], sequence[None])
    assert kept.item() == pytest.approx(full.item(), rel=1e-6)


def test_answer_rows_without_answers_keep_one_row():
    keep, targets, sequence = answer_rows(torch.full((2, 4), -100))
    assert keep.sum() == 1 and keep[0, 0] and targets.numel() == 0 and sequence.tolist() == [-100]


def test_ramp():
    assert [ramp(t, 4) for t in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert ramp(0, 0) == 1.0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    teacher, processor = tiny_qwen3vl(1, TinyConfig())
    teacher.eval().requires_grad_(False)
    student, _ = tiny_qwen3vl(2, TinyConfig(hidden=64, intermediate=192, heads=2, kv_heads=1, head_dim=32))
    stream = ShapesStream(seed=0)
    batch = Collator(processor)([stream[i] for i in range(2)])
    return teacher, student, batch, Accelerator(cpu=True)


def config(objective, **more):
    return TrainConfig(student="s", teacher=None if objective == "ce" else "t", out="o", objective=objective,
                       kd_warmup=0, rcka_warmup=0, **more)


@pytest.mark.parametrize("name, cls, terms", [("ce", CEObjective, {"ce"}), ("kd", KDObjective, {"ce", "kd"}),
                                              ("grace", GraceObjective, {"ce", "gdkd", "rcka"})])
def test_one_interface_for_every_objective(tiny, name, cls, terms):
    teacher, student, batch, acc = tiny
    objective = build_objective(config(name), student, teacher, acc)
    assert type(objective) is cls
    with objective.attach():
        got, weights, stats, logits = objective.losses(student, batch, step=0)
        loss, micro = micro_step(objective, student, batch, step=0)
    assert set(got) == set(weights) == terms and "labels" in batch          # the caller's batch is not changed
    assert logits.shape[0] == stats["tokens"] + 1                           # answer rows + the extra one
    expected = sum(weights[k] * got[k] for k in terms)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and micro["loss"] == pytest.approx(loss.item())
    fields = objective.end_step([micro])
    assert set(fields) == {"gdkd", "ema", "tau"} and set(objective.step_fields(0)) == {"beta", "kd_weight",
                                                                                        "rcka_weight"}


def test_kd_term_is_plain_kd_of_the_answer_rows(tiny):
    teacher, student, batch, acc = tiny
    objective = build_objective(config("kd", temperature=3.0), student, teacher, acc)
    got, _, _, logits = objective.losses(student, batch, step=0)
    keep, _, _ = answer_rows(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        teacher_rows = teacher(**inputs, use_cache=False).logits[keep]
    assert got["kd"].item() == pytest.approx(kd_loss(logits[:-1], teacher_rows[:-1], 3.0).item(), rel=1e-5)


def test_grace_controller_moves_beta_after_the_step_and_round_trips(tiny):
    teacher, student, batch, acc = tiny
    objective = build_objective(config("grace", tau=0.0, eta=0.5), student, teacher, acc)
    with objective.attach():
        _, micro = micro_step(objective, student, batch, step=0)
    assert objective.step_fields(0)["beta"] == 1.0
    fields = objective.end_step([micro])
    assert fields["gdkd"] == pytest.approx(micro["gdkd"]) and objective.beta() == pytest.approx(1 + 0.5 * micro["gdkd"])
    saved = objective.state_dict()
    fresh = build_objective(config("grace", tau=0.0, eta=0.5), student, teacher, acc)
    fresh.load_state_dict(saved)
    assert fresh.beta() == objective.beta() and fresh.controller.ema == objective.controller.ema


def test_every_term_non_finite_still_gives_a_zero_loss_with_a_graph(tiny, monkeypatch):
    teacher, student, batch, acc = tiny
    import grace.distill

    monkeypatch.setattr(grace.distill, "ce_loss", lambda logits, targets: logits.sum() * math.nan)
    loss, stats = micro_step(build_objective(config("ce"), student, None, acc), student, batch, step=0)
    assert loss.item() == 0.0 and loss.requires_grad and stats["nonfinite"] == 1 and math.isnan(stats["ce"])


def test_objectives_that_need_a_teacher_refuse_to_start_without_one(tiny):
    _, student, _, acc = tiny
    with pytest.raises(ValueError, match="needs a teacher"):
        build_objective(config("kd"), student, None, acc)


def test_controller_timing_after_the_step_or_at_the_last_micro_batch(tiny):
    """after_step: both micro-batches of step t use beta_t, the cycle's mean moves beta afterwards.
    last_micro_batch (the authors'): the second micro-batch already uses beta_{t+1} from that mean."""
    teacher, student, batch, acc = tiny
    results = {}
    for timing in ("after_step", "last_micro_batch"):
        objective = build_objective(config("grace", tau=0.0, eta=0.5, controller_update=timing), student, teacher,
                                    acc)
        with objective.attach():
            first = objective.losses(student, batch, step=0, last=False)
            second = objective.losses(student, batch, step=0, last=True)
        mean = (first[0]["gdkd"].item() + second[0]["gdkd"].item()) / 2
        fields = objective.end_step([first[2], second[2]])
        results[timing] = (first[1]["gdkd"], second[1]["gdkd"], fields, objective.beta(), mean)
    w1, w2, fields, beta, mean = results["after_step"]
    assert w1 == w2 == 1.0 and beta == pytest.approx(1 + 0.5 * mean) and fields["gdkd"] == pytest.approx(mean)
    w1, w2, fields, beta, mean = results["last_micro_batch"]
    assert w1 == 1.0 and w2 == pytest.approx(1 + 0.5 * mean) and beta == pytest.approx(w2)
    assert fields["beta"] == fields["kd_weight"] == pytest.approx(w2) and fields["gdkd"] == pytest.approx(mean)
