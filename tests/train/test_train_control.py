"""Stop requests: a STOP file (how the app asks) and SIGTERM end a run at a step boundary with a checkpoint."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from grace.train import STOP_FILE, train
from grace.train.control import StopRequest

from train_helpers import read_lines, settings


def wait_for_step(out: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "metrics.jsonl"
        if path.is_file() and '"event": "step"' in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no step logged in {out} within {timeout} s")


def assert_stopped_with_checkpoint(out: Path) -> dict:
    end = read_lines(out)[-1]
    assert end["event"] == "end" and end["outcome"] == "stopped" and end["error"] is None
    checkpoint = out / f"checkpoint-{end['step']}"
    assert {p.name for p in checkpoint.iterdir()} == {"model.safetensors", "optimizer.pt", "scheduler.pt",
                                                      "trainer_state.json", "rng_state_0.pt"}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == end["step"]
    assert not (out / STOP_FILE).exists()      # consumed, so resuming does not stop at once
    return end


def test_stop_file_ends_the_run_cleanly(models, tmp_path):
    out = tmp_path / "run"
    watcher = threading.Thread(target=lambda: (wait_for_step(out, 60), (out / STOP_FILE).touch()))
    watcher.start()
    result = train(settings(models, out, steps=500, bits=16, checkpoint_every=1000))
    watcher.join()
    assert result.outcome == "stopped" and 1 <= result.step < 500
    end = assert_stopped_with_checkpoint(out)
    assert end["step"] == result.step and end["reason"].endswith(f"{STOP_FILE} found")
    assert not (out / "final").exists()


def test_a_stale_stop_file_does_not_stop_a_new_run(models, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / STOP_FILE).touch()
    result = train(settings(models, out, steps=2, bits=16, teacher="none"))
    assert result.outcome == "finished" and result.step == 2


def test_stop_request_restores_the_signal_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(tmp_path) as request:
        assert signal.getsignal(signal.SIGTERM) != before and not request.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested() and request.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


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
