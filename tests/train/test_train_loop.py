"""grace.train on tiny Qwen3-VL models (CPU): the GRACE objective, the controller, metrics, the outputs,
the CE / KD objectives, non-finite terms and failures."""

import json
import math
from pathlib import Path

import pytest
import torch

import grace
from grace.chat import GenerationSettings, answer
from grace.data.conversations import DataError
from grace.data.shapes import make_sample
from grace.tiny import TinyConfig, save_tiny
from grace.train import train
from grace.train.loop import cosine_schedule
from grace.train.sampler import ResumableSampler

from train_helpers import STEP_KEYS, read_lines, settings, steps_of, tensors


def expected_lr(peak: float, step: int, warmup: int, total: int, floor: float) -> float:
    """The schedule written out: optimizer step s (0-based) warms up linearly to the peak at s = warmup - 1,
    then decays by half a cosine to floor x peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step + 1 - warmup) / (total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def one_minus_cka(lines, part: slice) -> float:
    values = [1 - line["cka"] for line in steps_of(lines)[part]]
    return sum(values) / len(values)


def test_grace_w4_run_aligns_and_logs_everything(grace_run, models):
    config, result = grace_run
    assert result.outcome == "finished" and result.step == 24
    lines = read_lines(result.out)
    assert lines[0]["event"] == "config" and lines[0]["bits"] == 4 and lines[0]["objective_resolved"] == "grace"
    assert lines[-1] == lines[-1] | {"event": "end", "outcome": "finished", "step": 24, "error": None}
    steps = steps_of(lines)
    assert [s["step"] for s in steps] == list(range(1, 25))
    for s in steps:
        assert STEP_KEYS <= set(s), STEP_KEYS - set(s)
        assert all(math.isfinite(s[k]) for k in ("loss", "ce", "gdkd", "rcka", "cka", "quant_scale", "tokens_per_s"))
        assert s["nonfinite"] == 0 and s["max_steps"] == 24 and s["quant_scale"] > 0
        assert s["lr"] == pytest.approx(expected_lr(3e-3, s["step"] - 1, 2, 24, 0.1), rel=1e-9)
        assert 1 / math.e - 1e-6 <= s["gate_min"] <= s["gate_mean"] <= s["gate_max"] <= 1 + 1e-6
        assert s["loss"] == pytest.approx(s["ce"] + s["kd_weight"] * s["gdkd"] + s["rcka_weight"] * s["rcka"],
                                          rel=1e-4, abs=1e-6)
    assert steps[-1]["eta_s"] == 0 and steps[0]["eta_s"] > 0
    assert steps[-1]["ce"] < steps[0]["ce"]
    # The KD and R-CKA ramps: r(t) = min(1, t / 2) with t the steps done before this one.
    assert [s["kd_weight"] / s["beta"] for s in steps[:3]] == [0.0, 0.5, 1.0]
    assert [s["rcka_weight"] for s in steps[:3]] == [0.0, 2.5, 5.0]
    # Checkpoints by steps (every 10) and at the end, each announced by a checkpoint line.
    assert [line["step"] for line in lines if line["event"] == "checkpoint"] == [10, 20, 24]


def test_lr_schedule_first_step_moves_and_ends_on_the_floor():
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([p], lr=2.0)
    schedule = cosine_schedule(optimizer, warmup=3, total=10, floor=0.1)
    seen = []
    for _ in range(10):
        seen.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([expected_lr(2.0, s, 3, 10, 0.1) for s in range(10)], rel=1e-12)
    assert seen[0] > 0 and seen[2] == pytest.approx(2.0) and seen[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(seen[2:], seen[3:]))          # strictly down after the peak


def test_rcka_is_what_aligns_the_student(grace_run, models):
    _, result = grace_run
    lines = read_lines(result.out)
    first, last = one_minus_cka(lines, slice(0, 5)), one_minus_cka(lines, slice(-5, None))
    assert last < first / 3, (first, last)
    control = train(settings(models, models["root"] / "run-omega0", omega=0.0, steps=12, checkpoint_every=100))
    assert one_minus_cka(read_lines(control.out), slice(-5, None)) > 3 * one_minus_cka(lines, slice(7, 12))


def test_beta_follows_the_controller_rule(grace_run):
    """Recompute beta from the logged L_GDKD with the rule written out here (not the library's class):
    step t trains with beta_t; its gdkd updates the EMA (seeded by the first value) and beta_{t+1}."""
    config, result = grace_run
    beta, ema = config.beta_init, None
    for s in steps_of(read_lines(result.out)):
        assert s["beta"] == pytest.approx(beta, rel=1e-12) and s["tau"] == config.tau
        ema = s["gdkd"] if ema is None else config.ema_decay * ema + (1 - config.ema_decay) * s["gdkd"]
        beta = min(max(beta + config.eta * (ema - config.tau), config.beta_min), config.beta_max)
        assert s["ema"] == pytest.approx(ema, rel=1e-12)
    assert beta > config.beta_init + 0.5          # tau=0: beta climbs while L_GDKD > 0


def test_outputs_load_and_generate(grace_run, models):
    _, result = grace_run
    out = result.out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-24"]
    assert result.final == out / "final" and result.export == out / "export-awq"
    qat = grace.load(out / "final", device="cpu", dtype=torch.float32)
    assert qat.format == "grace-qat" and qat.kind == "int4"
    awq = grace.load(out / "export-awq", device="cpu", dtype=torch.float32)
    assert awq.format == "grace-awq" and awq.kind == "int4" and awq.quantized_modules
    generation = answer(awq, make_sample("test", 0, 0).image, "What color is the circle?",
                        GenerationSettings(max_new_tokens=4))
    assert generation.done and len(generation.token_ids) >= 1


def test_teacher_stays_out_and_vision_stays_frozen(grace_run, models):
    _, result = grace_run

    source = tensors(models["student"] / "model.safetensors")
    final = tensors(result.out / "final" / "model.safetensors")
    visual = [k for k in source if ".visual." in k or k.startswith("visual.")]
    assert visual and all(torch.equal(source[k], final[k]) for k in visual)
    assert not torch.equal(source["model.language_model.norm.weight"], final["model.language_model.norm.weight"])
    # The optimizer holds exactly the student's non-vision tensors (weights and QAT scales): no teacher, no vision.
    checkpoint = result.out / "checkpoint-24"
    saved = tensors(checkpoint / "model.safetensors")
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    in_optimizer = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert in_optimizer == len([k for k in saved if "visual" not in k])
    assert any(k.endswith("log_scale") for k in saved)


def test_ce_only_bf16_run(models, tmp_path):
    result = train(settings(models, tmp_path / "ce", teacher="none", bits=16, steps=3))
    assert result.outcome == "finished" and result.export is None
    s = steps_of(read_lines(result.out))[-1]
    assert s["gdkd"] is None and s["beta"] is None and s["quant_scale"] is None and math.isfinite(s["ce"])
    assert s["loss"] == pytest.approx(s["ce"])
    loaded = grace.load(result.final, device="cpu")
    assert loaded.format == "plain" and loaded.kind == "bf16"


def test_plain_kd_w8_run_exports_int8(models, tmp_path):
    result = train(settings(models, tmp_path / "kd", objective="kd", bits=8, steps=3, kd_warmup=0))
    s = steps_of(read_lines(result.out))[-1]
    assert s["gdkd"] is None and s["rcka"] is None and s["kd"] > 0 and s["beta"] == 1.0
    assert s["loss"] == pytest.approx(s["ce"] + s["kd"], rel=1e-5)
    loaded = grace.load(result.export, device="cpu")
    assert result.export.name == "export-int8" and loaded.format == "grace-int8" and loaded.kind == "int8"


def test_nonfinite_term_is_left_out_and_counted(models, tmp_path, monkeypatch):
    import grace.distill

    real, calls = grace.distill.gated_dkd_loss, []

    def nan_on_second_call(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), stats) if len(calls) == 2 else (loss, stats)

    monkeypatch.setattr(grace.distill, "gated_dkd_loss", nan_on_second_call)
    result = train(settings(models, tmp_path / "nan", steps=4, bits=16, kd_warmup=0))
    steps = steps_of(read_lines(result.out))
    assert [s["nonfinite"] for s in steps] == [0, 1, 0, 0]
    assert steps[1]["gdkd"] is None and math.isfinite(steps[1]["loss"])
    assert steps[1]["loss"] == pytest.approx(steps[1]["ce"] + steps[1]["rcka_weight"] * steps[1]["rcka"], rel=1e-5)
    assert steps[2]["beta"] == steps[1]["beta"]            # the controller skipped the NaN
    assert steps[1]["beta"] != steps[0]["beta"]            # ... but not the finite value before it
    assert all(math.isfinite(s["ce"]) and math.isfinite(s["grad_norm"]) for s in steps)


def test_failure_writes_end_line_and_checkpoint(models, tmp_path):
    """A sample whose image is missing, drawn third (the loader reads one batch ahead, so step 2 fails)."""
    good = json.loads(Path(models["data"]).read_text())
    records = [good[i] | {"image": str(Path(models["data"]).parent / good[i]["image"])} for i in range(3)]
    order = iter(ResumableSampler(3, seed=0))
    third = [next(order) for _ in range(3)][2]
    records[third]["image"] = str(tmp_path / "missing.png")
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    with pytest.raises(DataError, match="missing.png"):
        train(settings(models, tmp_path / "run", data=str(data), batch_size=1, bits=16, steps=10))
    end = read_lines(tmp_path / "run")[-1]
    assert end["event"] == "end" and end["outcome"] == "failed" and "missing.png" in end["error"]
    assert "DataError" not in end["error"]                   # a sentence, not an exception name
    assert end["step"] == 1 and (tmp_path / "run" / "checkpoint-1" / "model.safetensors").is_file()


def test_teacher_with_another_vocabulary_is_refused(models, tmp_path):
    other = save_tiny(tmp_path / "other", 3, TinyConfig(image_size=128, vocab_size=400))
    with pytest.raises(ValueError, match="tokenizers differ"):
        train(settings(models, tmp_path / "run", teacher=str(other)))
    assert read_lines(tmp_path / "run")[-1]["outcome"] == "failed"


@pytest.mark.slow
def test_two_processes_share_the_stream_and_one_writes(models, tmp_path):
    """torchrun with 2 CPU processes (gloo DDP): each step covers the same 8 samples as one process with
    twice the batch, one metrics writer, one RNG file per rank, a loadable export."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = ["torchrun", "--nproc_per_node", "2", "-m", "grace", "train", "--teacher", str(models["teacher"]),
               "--student", str(models["student"]), "--bits", "4", "--group-size", "64", "--steps", "3",
               "--batch-size", "2", "--grad-accum", "2", "--data", "shapes", "--checkpoint-every", "2",
               "--checkpoint-minutes", "0", "--out", str(out)]
    done = subprocess.run([Path(sys.executable).parent / command[0], *command[1:]], capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    lines = [line for line in read_lines(out) if line["event"] != "checkpoint"]
    assert [line["event"] for line in lines] == ["config", "step", "step", "step", "end"]
    assert lines[0]["processes"] == 2 and lines[-1]["outcome"] == "finished"
    assert {p.name for p in (out / "checkpoint-3").glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    single = train(settings(models, tmp_path / "one", data="shapes", steps=3, batch_size=4, grad_accum=2))
    assert [s["tokens"] for s in steps_of(lines)] == [s["tokens"] for s in steps_of(read_lines(single.out))]
    assert grace.load(out / "export-awq", device="cpu").format == "grace-awq"


def test_gradient_checkpointing_changes_memory_not_the_trajectory(models, tmp_path):
    common = dict(bits=16, steps=3, kd_warmup=0, rcka_warmup=0, checkpoint_every=100)
    plain = steps_of(read_lines(train(settings(models, tmp_path / "plain", **common)).out))
    recomputed = steps_of(read_lines(train(settings(models, tmp_path / "gc", gradient_checkpointing=True,
                                                    **common)).out))
    for a, b in zip(plain, recomputed):
        for key in ("loss", "ce", "gdkd", "rcka", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)


def test_grace_train_is_the_package_and_runs_when_called(models, tmp_path):
    """grace.train(TrainConfig(...)) runs a training, and grace.train.<module> stays reachable in every import
    style (a function named like the package would hide it)."""
    import sys

    import grace.train.metrics as metrics

    assert grace.train is sys.modules["grace.train"] and metrics.METRICS_FILE == "metrics.jsonl"
    result = grace.train(settings(models, tmp_path / "run", teacher="none", bits=16, steps=1))
    assert result.outcome == "finished" and result.step == 1


@pytest.mark.slow
def test_accelerate_launch_runs_the_trainer(models, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "1", "-m",
               "grace", "train", "--student", str(models["student"]), "--teacher", "none", "--bits", "16",
               "--steps", "2", "--batch-size", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert read_lines(out)[-1] | {"outcome": "finished", "step": 2} == read_lines(out)[-1]
