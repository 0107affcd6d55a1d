"""Checkpoints: exact resume (6 + 6 == 12 steps), checkpoints by time, a failing write reported at once,
and a resumed run's metrics that keep no stale steps."""

import errno
import math
import shutil

import pytest

from grace.train import CheckpointError, read_metrics, train
from grace.train import checkpoint as checkpoint_module
from grace.train.checkpoint import CheckpointTimer, checkpoint_dirs
from grace.train.cli import main
from grace.train.config import TrainConfig

from train_helpers import read_lines, settings, steps_of

COMPARED = ("loss", "ce", "gdkd", "rcka", "cka", "beta", "ema", "lr", "quant_scale", "grad_norm", "tokens")


def assert_same_trajectory(a: list[dict], b: list[dict]) -> None:
    assert [s["step"] for s in a] == [s["step"] for s in b]
    for x, y in zip(a, b):
        for key in COMPARED:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)


def test_resume_continues_the_same_trajectory(models, tmp_path):
    """6 steps, stop, resume to 12 == 12 in one go (streamed shapes data, gradient accumulation)."""
    common = dict(data="shapes", image_size=64, steps=12, batch_size=2, grad_accum=2, checkpoint_every=100)
    split = train(settings(models, tmp_path / "split", stop_after=6, **common))
    assert split.outcome == "stopped" and split.step == 6 and (tmp_path / "split" / "checkpoint-6").is_dir()
    assert main(["--resume", str(tmp_path / "split")]) == 0      # everything else from the checkpoint
    whole = train(settings(models, tmp_path / "whole", **common))
    assert whole.outcome == "finished" and (tmp_path / "split" / "export-awq").is_dir()
    split_lines = read_lines(tmp_path / "split")
    assert [line["event"] for line in split_lines].count("config") == 2
    assert [line.get("outcome") for line in split_lines if line["event"] == "end"] == ["stopped", "finished"]
    a, b = steps_of(split_lines), steps_of(read_lines(tmp_path / "whole"))
    assert [s["step"] for s in a] == list(range(1, 13))
    assert_same_trajectory(a, b)


def test_resume_after_lost_steps_keeps_a_clean_series(models, tmp_path):
    """A job killed after step 5 whose last checkpoint is step 3: the resumed run redoes steps 4-5; the
    file keeps the lost lines (it is only appended to) but says so, and the reader drops them."""
    common = dict(data="shapes", image_size=64, steps=8, batch_size=2, checkpoint_every=3, keep_checkpoints=5)
    out = tmp_path / "run"
    train(settings(models, out, stop_after=5, **common))
    shutil.rmtree(out / "checkpoint-5")                 # as if killed before the stop's checkpoint was written
    lost = [s for s in steps_of(read_lines(out)) if s["step"] > 3]
    assert main(["--resume", str(out)]) == 0
    lines = read_lines(out)
    assert [s["step"] for s in steps_of(lines)] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]      # raw: steps 4-5 twice
    resumed = [line for line in lines if line["event"] == "config"][1]
    assert resumed["start_step"] == 3 and resumed["discarded_steps"] == 2
    folded = read_metrics(out)
    assert [s["step"] for s in folded.steps] == list(range(1, 9)) and folded.discarded == 2
    assert folded.attempts == 2 and folded.end["outcome"] == "finished" and folded.checkpoint["step"] == 8
    redone = [s for s in folded.steps if s["step"] in (4, 5)]
    assert [s["time"] for s in redone] != [s["time"] for s in lost]        # the stale lines are the ones gone
    whole = train(settings(models, tmp_path / "whole", **common))
    assert_same_trajectory(folded.steps, read_metrics(whole.out).steps)


def test_checkpoints_by_time(models, tmp_path, monkeypatch):
    """checkpoint_every far away, a due time after every step: each step is checkpointed (and announced).
    (The write-time stretch is switched off here; its own test is below.)"""
    monkeypatch.setattr(CheckpointTimer, "MAX_SHARE", math.inf)
    result = train(settings(models, tmp_path / "run", bits=16, steps=4, checkpoint_every=1000,
                            checkpoint_minutes=1e-9))
    lines = read_lines(result.out)
    assert [line["step"] for line in lines if line["event"] == "checkpoint"] == [1, 2, 3, 4]
    assert [p.name for p in checkpoint_dirs(result.out)] == ["checkpoint-3", "checkpoint-4"]    # keep 2
    untimed = train(settings(models, tmp_path / "untimed", bits=16, steps=4, checkpoint_every=1000))
    assert [line["step"] for line in read_lines(untimed.out) if line["event"] == "checkpoint"] == [4]


def test_checkpoint_timer_bounds_the_work_at_risk_and_the_overhead():
    now = [0.0]
    timer = CheckpointTimer(TrainConfig(student="s", out="o").checkpoint_minutes, clock=lambda: now[0])
    now[0] = 59.0
    assert not timer.due()
    now[0] = 60.0
    assert timer.due()                     # the default: at most a minute of work at risk
    timer.saved(write_seconds=30.0)        # a slow write (a big model): at most 10 % of the time goes to writing
    now[0] += 299.0
    assert not timer.due()
    now[0] += 1.0
    assert timer.due()
    assert not CheckpointTimer(0, clock=lambda: 1e9).due()      # 0: by steps only


def test_failing_checkpoint_write_is_reported_at_once(models, tmp_path, monkeypatch, capsys):
    """A full disk at the first (timed) checkpoint ends the run there, with a plain sentence in the end
    line and on stderr, and leaves no partial checkpoint behind."""
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_model", disk_full)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="No space left on device"):
        train(settings(models, out, bits=16, steps=50, checkpoint_every=1000, checkpoint_minutes=1e-9))
    end = read_lines(out)[-1]
    assert end["event"] == "end" and end["outcome"] == "failed" and end["step"] == 1
    assert end["error"].startswith("could not write the checkpoint of step 1") and "OSError" not in end["error"]
    assert not list(out.glob("checkpoint-*"))                     # neither a checkpoint nor a .partial
    assert "No space left on device" in capsys.readouterr().err
    # The command line says it in words and exits 1, without a traceback.
    argv = ["--student", str(models["student"]), "--teacher", "none", "--bits", "16", "--steps", "50",
            "--data", str(models["data"]), "--checkpoint-minutes", "1e-9", "--out", str(tmp_path / "cli")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "could not write the checkpoint of step 1" in err and "Traceback" not in err
