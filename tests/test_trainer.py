"""grace.train on tiny Qwen3-VL models (CPU): the GRACE objective, the controller, metrics, checkpoints,
resume, stop requests, failures and the exported releases."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import grace
from grace.chat import GenerationSettings, answer
from grace.data.conversations import DataError
from grace.data.shapes import make_sample, write_split
from grace.tiny import TinyConfig, save_tiny
from grace.trainer import (ResumableSampler, TrainConfig, answer_rows, lr_factor, main, train)

STEP_KEYS = {"step", "time", "lr", "loss", "ce", "gdkd", "rcka", "cka", "beta", "ema", "tau", "gate_mean", "gate_min",
             "gate_max", "tokens_per_s", "quant_scale", "max_steps", "eta_s", "nonfinite"}
# 128-pixel processors: 16 image tokens per image, enough for a meaningful CKA.
TEACHER = TinyConfig(image_size=128)
STUDENT = TinyConfig(hidden=64, intermediate=192, heads=2, kv_heads=1, head_dim=32, vision_hidden=64,
                     vision_intermediate=128, vision_heads=2, image_size=128)


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared CPU cores: a single torch thread avoids oversubscription stalls (25x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"teacher": save_tiny(root / "teacher", 1, TEACHER), "student": save_tiny(root / "student", 2, STUDENT),
            "data": write_split(root / "data", "train", 4, seed=0, image_size=128), "root": root}


def settings(models, out, **overrides) -> TrainConfig:
    base = dict(student=str(models["student"]), teacher=str(models["teacher"]), out=str(out), data=str(models["data"]),
                bits=4, group_size=64, steps=24, batch_size=4, lr=3e-3, scale_lr=3e-3, warmup_steps=2, kd_warmup=2,
                rcka_warmup=2, omega=5.0, tau=0.0, eta=0.5, log_every=100, checkpoint_every=10)
    return TrainConfig(**{**base, **overrides})


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def steps_of(lines) -> list[dict]:
    return [line for line in lines if line["event"] == "step"]


def one_minus_cka(lines, part: slice) -> float:
    values = [1 - line["cka"] for line in steps_of(lines)[part]]
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def grace_run(models):
    torch.set_num_threads(1)
    config = settings(models, models["root"] / "run-w4")
    return config, train(config)


def test_grace_w4_run_aligns_and_logs_everything(grace_run, models):
    config, result = grace_run
    assert result.outcome == "finished" and result.step == 24
    lines = read_metrics(result.out)
    assert lines[0]["event"] == "config" and lines[0]["bits"] == 4 and lines[0]["objective_resolved"] == "grace"
    assert lines[-1] == lines[-1] | {"event": "end", "outcome": "finished", "step": 24, "error": None}
    steps = steps_of(lines)
    assert [s["step"] for s in steps] == list(range(1, 25))
    for s in steps:
        assert STEP_KEYS <= set(s), STEP_KEYS - set(s)
        assert all(math.isfinite(s[k]) for k in ("loss", "ce", "gdkd", "rcka", "cka", "quant_scale", "tokens_per_s"))
        assert s["nonfinite"] == 0 and s["max_steps"] == 24 and s["quant_scale"] > 0
        assert s["lr"] == pytest.approx(3e-3 * lr_factor(s["step"] - 1, 2, 24, 0.1))
        assert 1 / math.e - 1e-6 <= s["gate_min"] <= s["gate_mean"] <= s["gate_max"] <= 1 + 1e-6
    assert steps[-1]["eta_s"] == 0 and steps[0]["eta_s"] > 0
    assert steps[-1]["ce"] < steps[0]["ce"]
    # The KD and R-CKA ramps: r(t) = min(1, t / 2) with t the steps done before this one.
    assert [s["kd_weight"] / s["beta"] for s in steps[:3]] == [0.0, 0.5, 1.0]
    assert [s["rcka_weight"] for s in steps[:3]] == [0.0, 2.5, 5.0]


def test_rcka_is_what_aligns_the_student(grace_run, models):
    _, result = grace_run
    lines = read_metrics(result.out)
    first, last = one_minus_cka(lines, slice(0, 5)), one_minus_cka(lines, slice(-5, None))
    assert last < first / 3, (first, last)
    control = train(settings(models, models["root"] / "run-omega0", omega=0.0, steps=12, checkpoint_every=100))
    assert one_minus_cka(read_metrics(control.out), slice(-5, None)) > 3 * one_minus_cka(lines, slice(7, 12))


def test_beta_follows_the_controller_rule(grace_run):
    """Recompute beta from the logged L_GDKD with the rule written out here (not the library's class):
    step t trains with beta_t; its gdkd updates the EMA (seeded by the first value) and beta_{t+1}."""
    config, result = grace_run
    beta, ema = config.beta_init, None
    for s in steps_of(read_metrics(result.out)):
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

    def tensors(path):
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

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


def test_resume_continues_the_same_trajectory(models, tmp_path):
    """6 steps, stop, resume to 12 == 12 in one go (streamed shapes data, gradient accumulation)."""
    common = dict(data="shapes", image_size=64, steps=12, batch_size=2, grad_accum=2, checkpoint_every=100)
    split = train(settings(models, tmp_path / "split", stop_after=6, **common))
    assert split.outcome == "stopped" and split.step == 6 and (tmp_path / "split" / "checkpoint-6").is_dir()
    assert main(["--resume", str(tmp_path / "split")]) == 0      # everything else from the checkpoint
    whole = train(settings(models, tmp_path / "whole", **common))
    assert whole.outcome == "finished" and (tmp_path / "split" / "export-awq").is_dir()
    split_lines = read_metrics(tmp_path / "split")
    assert [line["event"] for line in split_lines].count("config") == 2
    assert [line.get("outcome") for line in split_lines if line["event"] == "end"] == ["stopped", "finished"]
    a, b = steps_of(split_lines), steps_of(read_metrics(tmp_path / "whole"))
    assert [s["step"] for s in a] == [s["step"] for s in b] == list(range(1, 13))
    for x, y in zip(a, b):
        for key in ("loss", "ce", "gdkd", "rcka", "cka", "beta", "ema", "lr", "quant_scale", "grad_norm", "tokens"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)


def wait_for_step(out: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "metrics.jsonl"
        if path.is_file() and '"event": "step"' in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no step logged in {out} within {timeout} s")


def assert_stopped_with_checkpoint(out: Path) -> dict:
    end = read_metrics(out)[-1]
    assert end["event"] == "end" and end["outcome"] == "stopped" and end["error"] is None
    checkpoint = out / f"checkpoint-{end['step']}"
    assert {p.name for p in checkpoint.iterdir()} == {"model.safetensors", "optimizer.pt", "scheduler.pt",
                                                      "trainer_state.json", "rng_state_0.pt"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == end["step"]
    assert not (out / "STOP").exists()      # consumed, so resuming does not stop at once
    return end


def test_stop_file_ends_the_run_cleanly(models, tmp_path):
    out = tmp_path / "run"
    watcher = threading.Thread(target=lambda: (wait_for_step(out, 60), (out / "STOP").touch()))
    watcher.start()
    result = train(settings(models, out, steps=500, bits=16, checkpoint_every=1000))
    watcher.join()
    assert result.outcome == "stopped" and 1 <= result.step < 500
    assert assert_stopped_with_checkpoint(out)["step"] == result.step
    assert not (out / "final").exists()


def test_sigterm_stops_a_cli_run_within_seconds(models, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "grace", "train", "--teacher", "none", "--student", str(models["student"]),
               "--bits", "16", "--steps", "100000", "--data", "shapes", "--out", str(out), "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_step(out, 120)
        sent = time.time()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, output.decode()[-2000:]
    assert time.time() - sent < 10
    assert assert_stopped_with_checkpoint(out)["step"] >= 1
    assert b"SIGTERM" in output


@pytest.mark.slow
def test_two_processes_share_the_stream_and_one_writes(models, tmp_path):
    """torchrun with 2 CPU processes (gloo DDP): each step covers the same 8 samples as one process with
    twice the batch, one metrics writer, one RNG file per rank, a loadable export."""
    out = tmp_path / "ddp"
    command = ["torchrun", "--nproc_per_node", "2", "-m", "grace", "train", "--teacher", str(models["teacher"]),
               "--student", str(models["student"]), "--bits", "4", "--group-size", "64", "--steps", "3",
               "--batch-size", "2", "--grad-accum", "2", "--data", "shapes", "--checkpoint-every", "2",
               "--out", str(out)]
    done = subprocess.run([Path(sys.executable).parent / command[0], *command[1:]], capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    lines = read_metrics(out)
    assert [line["event"] for line in lines] == ["config", "step", "step", "step", "end"]
    assert lines[0]["processes"] == 2 and lines[-1]["outcome"] == "finished"
    assert {p.name for p in (out / "checkpoint-3").glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    single = train(settings(models, tmp_path / "one", data="shapes", steps=3, batch_size=4, grad_accum=2))
    assert [s["tokens"] for s in steps_of(lines)] == [s["tokens"] for s in steps_of(read_metrics(single.out))]
    assert grace.load(out / "export-awq", device="cpu").format == "grace-awq"


def test_ce_only_bf16_run(models, tmp_path):
    result = train(settings(models, tmp_path / "ce", teacher="none", bits=16, steps=3))
    assert result.outcome == "finished" and result.export is None
    s = steps_of(read_metrics(result.out))[-1]
    assert s["gdkd"] is None and s["beta"] is None and s["quant_scale"] is None and math.isfinite(s["ce"])
    assert s["loss"] == pytest.approx(s["ce"])
    loaded = grace.load(result.final, device="cpu")
    assert loaded.format == "plain" and loaded.kind == "bf16"


def test_plain_kd_w8_run_exports_int8(models, tmp_path):
    result = train(settings(models, tmp_path / "kd", objective="kd", bits=8, steps=3, kd_warmup=0))
    s = steps_of(read_metrics(result.out))[-1]
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
    steps = steps_of(read_metrics(result.out))
    assert [s["nonfinite"] for s in steps] == [0, 1, 0, 0]
    assert steps[1]["gdkd"] is None and math.isfinite(steps[1]["loss"])
    assert steps[2]["beta"] == steps[1]["beta"]            # the controller skipped the NaN
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
    end = read_metrics(tmp_path / "run")[-1]
    assert end["event"] == "end" and end["outcome"] == "failed" and "missing.png" in end["error"]
    assert end["step"] == 1 and (tmp_path / "run" / "checkpoint-1" / "model.safetensors").is_file()


def test_teacher_with_another_vocabulary_is_refused(models, tmp_path):
    other = save_tiny(tmp_path / "other", 3, TinyConfig(image_size=128, vocab_size=400))
    with pytest.raises(ValueError, match="tokenizers differ"):
        train(settings(models, tmp_path / "run", teacher=str(other)))
    assert read_metrics(tmp_path / "run")[-1]["outcome"] == "failed"


@pytest.mark.parametrize("release, bits", [("qwen3vl-tiny-grace-w4g128-qat", 4), ("qwen3vl-tiny-grace-w8g128-qat", 8)])
def test_qat_release_student_starts_from_the_released_weights(fixtures_dir, release, bits):
    """A QAT release as student starts from its sidecar step sizes: its fake-quantized weights are the
    released ones, code * exp(log_scale), not those of a fresh (different) grid."""
    from grace.distill.fake_quant import fake_quant_modules
    from grace.checkpoint_files import read_sidecar
    from grace.trainer import load_student

    sidecar = read_sidecar(fixtures_dir / release / "qat_quantized_weights.bin")
    loaded, _, names = load_student(TrainConfig(student=str(fixtures_dir / release), out="x", bits=bits), "cpu")
    assert loaded.format == "grace-qat" and names
    for name, module in fake_quant_modules(loaded.model).items():
        step = sidecar[name + ".log_scale"].float().exp().reshape(module.out_features, -1, 1)
        codes = torch.round(sidecar[name + ".weight"].float().reshape(module.out_features, -1, 128) / step)
        released = (codes * step).reshape(module.out_features, module.in_features)
        assert torch.allclose(module.quantized_weight(), released, rtol=1e-6, atol=0), name


def test_bad_configuration_is_reported():
    with pytest.raises(ValueError, match="bits must be 4, 8 or 16"):
        TrainConfig(student="s", out="o", bits=3)
    with pytest.raises(ValueError, match="needs a teacher"):
        TrainConfig(student="s", out="o", objective="grace")
    with pytest.raises(ValueError, match="beta_min <= beta_init"):
        TrainConfig(student="s", out="o", beta_init=9.0)
    assert TrainConfig(student="s", out="o", teacher="none").resolved_objective == "ce"
    assert main(["--student", "s", "--out", "o", "--steps", "0"]) == 2


def test_answer_rows_feed_only_answer_logits():
    """The kept rows, flattened, read as one sequence: row i predicts sequence_labels[i + 1]; the gated DKD
    over them equals the gated DKD over the full logits."""
    from grace.distill import gated_dkd_loss

    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    keep, targets, sequence = answer_rows(labels)
    assert keep.nonzero().tolist() == [[0, 1], [0, 2], [1, 0], [1, 1]]
    assert targets.tolist() == [5, 6, 7] and sequence.tolist() == [-100, 5, 6, 7]
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    full, _ = gated_dkd_loss(student, teacher, labels)
    kept, _ = gated_dkd_loss(student[keep][None], teacher[keep][None], sequence[None])
    assert kept.item() == pytest.approx(full.item(), rel=1e-6)


def test_lr_schedule_and_resumable_sampler():
    assert [round(lr_factor(s, 2, 10, 0.1), 6) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 0.1]
    assert lr_factor(5, 2, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    stream = ResumableSampler(5, seed=1)
    first = [next(iter_) for iter_ in [iter(stream)] for _ in range(12)]
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    assert [next(iter_) for iter_ in [iter(ResumableSampler(5, seed=1, start=7))] for _ in range(5)] == first[7:12]
    assert [next(iter_) for iter_ in [iter(ResumableSampler(None, seed=1, start=3))] for _ in range(2)] == [3, 4]
