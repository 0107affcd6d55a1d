"""demo/jobs.py, demo/job_guard.py, demo/cleanup.py: training jobs in their own process group; stop and
escalate; a killed server leaves no trainer behind; a restarted one adopts and stops a job left running;
past runs are listed, resumed and deleted; old runs are cleaned up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")

from app_server import REPO  # noqa: E402
from demo import cleanup, jobs  # noqa: E402
from demo.jobs import JobBusy, JobError, JobManager, RunLog, TrainRequest  # noqa: E402
from demo.train_view import thin  # noqa: E402

FAKE_TRAINER = Path(__file__).with_name("app_fake_trainer.py")


def request(steps: int = 5) -> TrainRequest:
    return TrainRequest({"teacher": "/models/t", "student": "/models/s", "bits": 4, "steps": steps,
                         "scale-lr": 1e-4}, "w4", {"bits": 4, "steps": steps})


def fake_manager(runs: Path, mode: str) -> JobManager:
    return JobManager(runs, command=[sys.executable, str(FAKE_TRAINER), mode])


def wait_until_ended(manager: JobManager, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (status := manager.poll())["state"] in ("starting", "running", "stopping"):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def test_job_runs_to_the_end_and_only_one_at_a_time(tmp_path):
    manager = fake_manager(tmp_path / "runs", "finish")
    job = manager.start(request(steps=8))
    assert manager.poll()["request"]["bits"] == 4
    assert (tmp_path / "runs" / jobs.LOCK_FILE).is_file()
    with pytest.raises(JobBusy, match="already running"):
        manager.start(request())
    status = wait_until_ended(manager)
    assert status["state"] == "finished" and status["error"] is None
    assert [s["step"] for s in manager.steps()] == list(range(1, 9))
    args = json.loads((job.out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert args["bits"] == "4" and args["scale-lr"] == "0.0001" and args["out"] == str(job.out_dir)
    assert not (tmp_path / "runs" / jobs.LOCK_FILE).exists()
    took = status["elapsed_s"]
    time.sleep(1.1)
    assert manager.poll()["elapsed_s"] == took         # "took" stops counting once the run ended
    manager.start(request())                            # the next job may start once this one ended
    wait_until_ended(manager)


def test_a_job_killed_mid_run_is_reported_as_failed(tmp_path):
    manager = fake_manager(tmp_path / "runs", "die")
    manager.start(request(steps=10))
    status = wait_until_ended(manager)
    assert status["state"] == "failed"
    assert "killed (SIGKILL)" in status["error"] and "out of memory" in status["error"]
    assert "about to be killed" in status["error"]            # the log's last lines are shown
    assert status["steps_logged"] == 2


def test_stop_writes_the_stop_file_and_escalates_when_ignored(tmp_path, monkeypatch):
    manager = fake_manager(tmp_path / "runs", "finish")
    manager.start(request(steps=200))
    wait_for(lambda: manager.poll()["steps_logged"] >= 1, 30, "a step")
    manager.stop()
    status = wait_until_ended(manager, timeout=10)
    assert status["state"] == "stopped" and status["outputs"]["checkpoint"].startswith("checkpoint-")

    monkeypatch.setattr(jobs, "STOP_TERM_AFTER_S", 0.5)
    monkeypatch.setattr(jobs, "STOP_KILL_AFTER_S", 1.5)
    stubborn = fake_manager(tmp_path / "runs2", "stubborn")
    stubborn.start(request(steps=500))
    wait_for(lambda: stubborn.poll()["steps_logged"] >= 1, 30, "a step")   # its SIGTERM handler is set
    stubborn.stop()
    status = wait_until_ended(stubborn, timeout=15)
    assert stubborn.job.exit_code == -signal.SIGKILL
    assert status["state"] == "failed" and "SIGKILL" in status["error"]


def test_status_names_no_absolute_server_path(tmp_path):
    manager = fake_manager(tmp_path / "runs", "finish")
    manager.start(request(steps=100))
    wait_for(lambda: manager.poll()["steps_logged"] >= 1, 30, "a step")
    manager.stop()
    status = wait_until_ended(manager)
    assert str(tmp_path) not in json.dumps(status) and "/models/" not in json.dumps(status)


def test_the_job_view_follows_grace_trains_reader(tmp_path):
    """Half-written lines wait, bad ones are skipped, a resume's redone steps appear once."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "config"}\nnot json\n{"event": "step", "step": 1}\n{"event": "step", "st')
    logged = RunLog().read(tmp_path)
    assert logged.config == {"event": "config"} and [s["step"] for s in logged.steps] == [1]
    with open(path, "a") as f:
        f.write('ep": 2}\n{"event": "step", "step": 3}\n{"event": "end", "outcome": "stopped"}\n')
    logged.read(tmp_path)
    assert [s["step"] for s in logged.steps] == [1, 2, 3] and logged.end["outcome"] == "stopped"
    with open(path, "a") as f:   # resumed from the step-2 checkpoint: step 3 was lost and is redone
        f.write('{"event": "config", "start_step": 2}\n{"event": "step", "step": 3}\n')
    logged.read(tmp_path)
    assert [s["step"] for s in logged.steps] == [1, 2, 3] and logged.end is None


SERVER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{repo!r}]
    from demo.jobs import JobManager, TrainRequest
    manager = JobManager({runs!r}, command=[sys.executable, {fake!r}, {mode!r}])
    job = manager.start(TrainRequest({{"steps": 1000}}, "w4"))
    print(job.pid, job.out_dir, flush=True)
    time.sleep(600)
""")


def start_server(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, int, Path]:
    """A stand-in server process running one job; returns (server, guard pid, run folder)."""
    script = SERVER.format(repo=str(REPO), runs=str(tmp_path / "runs"), fake=str(FAKE_TRAINER), mode=mode)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    pid, out_dir = server.stdout.readline().split()
    metrics = Path(out_dir) / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and '"step"' in metrics.read_text(), 30, "the first step")
    return server, int(pid), Path(out_dir)


def trainer_pids(guard: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{guard}/task/{guard}/children").read_text().split()] \
        if Path(f"/proc/{guard}").exists() else []


def test_a_killed_server_leaves_no_trainer_behind(tmp_path):
    server, guard, out_dir = start_server(tmp_path, "finish")
    trainers = trainer_pids(guard)
    assert trainers
    server.send_signal(signal.SIGKILL)                  # no handler can run: the guard must notice
    server.wait()
    wait_for(lambda: not any(jobs.process_alive(p) for p in [guard, *trainers]), 20, "the trainer to end")
    end = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["outcome"] == "stopped"      # checkpointed, then ended


def test_a_restarted_server_adopts_and_stops_a_job_left_running(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "STOP_TERM_AFTER_S", 0.5)
    monkeypatch.setattr(jobs, "STOP_KILL_AFTER_S", 1.5)
    server, guard, out_dir = start_server(tmp_path, "stubborn")    # ignores STOP and SIGTERM
    server.send_signal(signal.SIGKILL)
    server.wait()
    restarted = fake_manager(tmp_path / "runs", "finish")
    assert restarted.job is not None and restarted.job.run == out_dir.name
    with pytest.raises(JobBusy):                         # never two jobs at once
        restarted.start(request())
    status = wait_until_ended(restarted, timeout=20)
    assert status["state"] in ("stopped", "failed")
    assert not jobs.process_alive(guard)
    assert not (tmp_path / "runs" / jobs.LOCK_FILE).exists()
    assert fake_manager(tmp_path / "runs", "finish").job is None      # nothing left to adopt


def test_past_runs_are_listed_resumed_and_deleted(tmp_path):
    manager = fake_manager(tmp_path / "runs", "finish")
    first = manager.start(request(steps=100))
    wait_for(lambda: manager.poll()["steps_logged"] >= 3, 30, "three steps")
    manager.stop()
    stopped_at = wait_until_ended(manager)["step"]
    (listed,) = manager.runs()
    assert listed["run"] == first.run and listed["outcome"] == "stopped" and listed["resumable"]
    assert listed["step"] == stopped_at and listed["max_steps"] == "100"
    manager.start(TrainRequest({"steps": stopped_at + 2}), resume=first.run)   # resume, 2 more steps
    status = wait_until_ended(manager)
    assert status["state"] == "finished" and status["run"] == first.run
    assert [s["step"] for s in manager.steps()] == list(range(1, stopped_at + 3))   # no repeated steps
    assert manager.runs()[0]["outcome"] == "finished" and not manager.runs()[0]["resumable"]
    for bad in ("../etc", "/tmp", "nope", "", None, "a/b"):
        with pytest.raises(JobError, match="no such run"):
            manager.run_dir(bad)
    manager.delete(first.run)
    assert manager.runs() == [] and not first.out_dir.exists()


def test_a_running_run_cannot_be_deleted(tmp_path):
    manager = fake_manager(tmp_path / "runs", "finish")
    job = manager.start(request(steps=100))
    wait_for(lambda: manager.poll()["steps_logged"] >= 1, 30, "a step")
    with pytest.raises(JobError, match="stop it first"):
        manager.delete(job.run)
    manager.stop()
    wait_until_ended(manager)


def test_old_runs_and_cached_files_are_cleaned_up(tmp_path):
    runs = tmp_path / "runs"
    now = time.time()
    for i, (name, size, age_days) in enumerate([("old", 10, 40), ("a", 600, 3), ("b", 600, 2), ("live", 600, 1)]):
        (runs / name).mkdir(parents=True)
        (runs / name / "model.bin").write_bytes(b"\0" * size)
        os.utime(runs / name, (now - age_days * 86400,) * 2)
    deleted = cleanup.prune_runs(runs, max_bytes=1300, max_age_days=30, keep={"live"}, now=now)
    assert deleted == ["old", "a"] and sorted(p.name for p in runs.iterdir()) == ["b", "live"]
    cache = tmp_path / "cache" / "abc"
    cache.mkdir(parents=True)
    (cache / "old.png").write_bytes(b"x")
    (cache / "new.png").write_bytes(b"x")
    os.utime(cache / "old.png", (now - 3 * 3600,) * 2)
    (tmp_path / "cache" / "gradio-own").mkdir()
    (tmp_path / "cache" / "gone").mkdir()
    (tmp_path / "cache" / "gone" / "old.png").write_bytes(b"x")
    os.utime(tmp_path / "cache" / "gone" / "old.png", (now - 3 * 3600,) * 2)
    assert cleanup.prune_files(tmp_path / "cache", max_age_hours=2, now=now) == 2
    assert [p.name for p in cache.iterdir()] == ["new.png"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["abc", "gradio-own"]


def test_long_runs_are_thinned_for_drawing():
    steps = [{"step": i} for i in range(1, 5001)]
    drawn = thin(steps)
    assert len(drawn) <= 1001 and drawn[0]["step"] == 1 and drawn[-1]["step"] == 5000
    assert thin(steps[:10]) == steps[:10]
