"""Training jobs of the app: one at a time per server, each `python -m grace train ...` in its own process
group behind `demo.job_guard`, watched through its metrics.jsonl. No gradio here.

- Stop writes the trainer's stop file (it checkpoints and ends within seconds) and escalates to
  SIGTERM, then SIGKILL, if the process does not end.
- The server stopping (SIGTERM, Ctrl-C) stops the job the same way; the server dying (SIGKILL) is
  noticed by the guard, which stops it. A lock file in the runs folder names the running job, so a
  restarted server finds a job left running, adopts it and stops it: never two jobs, never an orphan.
- Past runs are read back from their folders: outcome, steps, last metrics; stopped ones resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from grace.trainer import METRICS_FILE, STOP_FILE

from .job_guard import STOP_KILL_AFTER_S, STOP_TERM_AFTER_S
from .settings import REPO_ROOT

log = logging.getLogger(__name__)

TRAIN_COMMAND = [sys.executable, "-m", "grace", "train"]
GUARD_COMMAND = [sys.executable, "-m", "demo.job_guard"]
LOCK_FILE = "running-job.json"      # in the runs folder, while a job of this app runs
LOG_FILE = "train.log"
ACTIVE = ("starting", "running", "stopping")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


class JobBusy(RuntimeError):
    """A job is already running on this server."""


class JobError(ValueError):
    """A run that does not exist or cannot do what was asked (resume a finished run, delete a running one)."""


@dataclass
class TrainRequest:
    """A new run (options = the trainer's --options) or the continuation of `resume` (a run name)."""

    options: dict[str, object]
    label: str = ""                 # e.g. "w4"; part of the new run's name
    describe: dict = field(default_factory=dict)   # what /train_status shows of the request (no paths)

    def argv(self) -> list[str]:
        return [part for name, value in self.options.items() for part in (f"--{name}", str(value))]


def read_metrics(path: Path, offset: int = 0, partial: bytes = b"") -> tuple[list[dict], int, bytes]:
    """Complete JSON lines of metrics.jsonl from `offset`: (records, new offset, the unfinished line)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset, partial
    lines = (partial + chunk).split(b"\n")
    records = []
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipping a line that is not JSON", path)
    return records, offset + len(chunk), lines[-1]


@dataclass
class RunLog:
    """What one run folder's metrics say: its config line, step records (a resumed run's lost steps dropped),
    its end line."""

    config: dict | None = None
    steps: list[dict] = field(default_factory=list)
    end: dict | None = None
    offset: int = 0
    partial: bytes = b""

    def add(self, records: list[dict]) -> None:
        for record in records:
            event = record.get("event")
            if event == "step":
                self.steps.append(record)
            elif event == "config":
                start = record.get("start_step")
                if isinstance(start, int):   # resumed: steps after the checkpoint were redone
                    self.steps = [s for s in self.steps if isinstance(s.get("step"), int) and s["step"] <= start]
                self.config, self.end = record, None
            elif event == "end":
                self.end = record

    def read(self, folder: Path) -> "RunLog":
        records, self.offset, self.partial = read_metrics(folder / METRICS_FILE, self.offset, self.partial)
        self.add(records)
        return self


@dataclass
class TrainingJob:
    run: str
    out_dir: Path
    pid: int
    request: TrainRequest | None = None    # None for a job adopted after a restart
    process: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    exit_code: int | None = None
    stop_requested: float | None = None
    log: RunLog = field(default_factory=RunLog)

    @property
    def alive(self) -> bool:
        """Any process of the job's group still runs (the guard, or a trainer that outlived it)."""
        if self.process is not None:
            self.process.poll()   # reap the guard once it ended
        return group_alive(self.pid)

    @property
    def state(self) -> str:
        if self.ended is None:
            if self.stop_requested:
                return "stopping"
            return "running" if self.log.steps else "starting"
        if self.log.end:
            return str(self.log.end.get("outcome", "failed"))
        if self.stop_requested and self.exit_code in (0, -signal.SIGTERM, None):
            return "stopped"
        return "failed"

    def error(self) -> str | None:
        if self.log.end and self.log.end.get("error"):
            return "The trainer reported: " + str(self.log.end["error"])
        if self.ended is None or self.log.end or self.state == "stopped":
            return None
        if self.exit_code in (-signal.SIGKILL, 137):
            why = "was killed (SIGKILL); most often the machine ran out of memory"
        elif self.exit_code is None:
            why = "ended without reporting how"
        else:
            why = f"exited with code {self.exit_code}"
        return f"The training process {why} before finishing.{log_tail(self.out_dir)}"

    def snapshot(self) -> dict:
        """The job for the UI and /train_status: no absolute server paths (outputs are relative to the run)."""
        last = self.log.steps[-1] if self.log.steps else {}
        config = self.log.config or {}
        end_time = self.ended or time.time()
        return {"state": self.state, "run": self.run, "step": last.get("step", 0),
                "max_steps": last.get("max_steps") or config.get("steps"), "eta_s": last.get("eta_s"),
                "tokens_per_s": last.get("tokens_per_s"), "elapsed_s": round(end_time - self.started, 1),
                "steps_logged": len(self.log.steps), "last": last, "error": self.error(),
                "outputs": relative_outputs(self.log.end, self.out_dir), "exit_code": self.exit_code,
                "request": self.request.describe if self.request else {"adopted": True}}


def relative_outputs(end: dict | None, run_dir: Path) -> dict[str, str]:
    outputs = {}
    for key, path in ((end or {}).get("outputs") or {}).items():
        if isinstance(path, str) and path:
            try:
                outputs[key] = str(Path(path).resolve().relative_to(run_dir.resolve()))
            except ValueError:
                outputs[key] = Path(path).name
    return outputs


def log_tail(run_dir: Path, lines: int = 8) -> str:
    try:
        text = (run_dir / LOG_FILE).read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    # The log names server paths; show only the lines' text after the last path separator of each path.
    text = [re.sub(r"(/[^\s:'\"]+)+/", "…/", line) for line in text]
    return "\nLast lines of its log:\n" + "\n".join(text) if text else ""


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie (ended, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def group_alive(pgid: int) -> bool:
    """Some process of group `pgid` is running (zombies do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def is_guard_of(pid: int, run_dir: Path) -> bool:
    """`pid` is still the guard of this run (not a recycled pid of some other process)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return process_alive(pid)   # no /proc: trust the pid
    return b"demo.job_guard" in cmdline and str(run_dir / STOP_FILE).encode() in cmdline


class JobManager:
    """Starts, watches and stops the server's single training job; lists, resumes and deletes runs."""

    def __init__(self, runs_dir: Path, command: list[str] | None = None):
        self.runs_dir = Path(runs_dir)
        self.command = list(command or TRAIN_COMMAND)
        self._lock = threading.Lock()
        self.job: TrainingJob | None = None
        self.version = 0            # bumped whenever the list of runs changes (start, end, delete)
        self.adopt_left_running()

    # -- the lock file -------------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.runs_dir / LOCK_FILE

    def adopt_left_running(self) -> None:
        """A job an earlier server left running (it was killed): adopt it and stop it."""
        try:
            held = json.loads(self.lock_path.read_text())
            run, pid = str(held["run"]), int(held["pid"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable %s", self.lock_path)
            self.lock_path.unlink(missing_ok=True)
            return
        run_dir = self.runs_dir / run
        if not (group_alive(pid) and (not process_alive(pid) or is_guard_of(pid, run_dir))):
            self.lock_path.unlink(missing_ok=True)
            return
        log.warning("training run %s (pid %d) was left running by an earlier server: stopping it", run, pid)
        job = TrainingJob(run, run_dir, pid, started=float(held.get("started") or time.time()))
        self.job = job
        self.stop()
        threading.Thread(target=self._watch, args=(job,), daemon=True, name=f"train-{run}").start()

    # -- one job -------------------------------------------------------------------------------------

    def start(self, request: TrainRequest, resume: str | None = None) -> TrainingJob:
        with self._lock:
            if self.job is not None and self.job.ended is None:
                raise JobBusy(f"A training job is already running on this server (run {self.job.run}, "
                              f"{self.job.state}). Only one job runs at a time: wait for it to end or stop it.")
            if resume:
                run, out_dir = resume, self.run_dir(resume)
                argv = ["--resume", str(out_dir)] + request.argv()
                (out_dir / STOP_FILE).unlink(missing_ok=True)
            else:
                run = time.strftime("%Y%m%d-%H%M%S") + (f"-{request.label}" if request.label else "")
                out_dir = self.runs_dir / run
                out_dir.mkdir(parents=True, exist_ok=False)
                argv = request.argv() + ["--out", str(out_dir)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
            command = GUARD_COMMAND + ["--stop-file", str(out_dir / STOP_FILE), "--"] + self.command + argv
            with open(out_dir / LOG_FILE, "ab") as log_file:
                process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                           stdout=log_file, stderr=subprocess.STDOUT,
                                           start_new_session=True)   # own process group: signals reach it all
            _prefer_oom_kill(process.pid)
            job = TrainingJob(run, out_dir, process.pid, request, process)
            if resume:   # show the resumed run from its start, then follow its new lines
                job.log.read(out_dir)
            self.job = job
            self.lock_path.write_text(json.dumps({"run": run, "pid": process.pid, "started": job.started,
                                                  "server_pid": os.getpid()}))
            self.version += 1
            threading.Thread(target=self._watch, args=(job,), daemon=True, name=f"train-{run}").start()
            log.info("started training run %s (pid %d)", run, process.pid)
            return job

    def _watch(self, job: TrainingJob) -> None:
        """Wait for the process; after Stop, escalate to SIGTERM / SIGKILL if it does not end."""
        while job.alive:
            if job.stop_requested:
                waited = time.time() - job.stop_requested
                if waited > STOP_KILL_AFTER_S:
                    _signal_group(job.pid, signal.SIGKILL)
                elif waited > STOP_TERM_AFTER_S:
                    _signal_group(job.pid, signal.SIGTERM)
            time.sleep(0.25)
        with self._lock:
            job.exit_code = job.process.wait() if job.process is not None else None
            job.log.read(job.out_dir)
            job.ended = time.time()
            self.version += 1
            if self.job is job:
                self.lock_path.unlink(missing_ok=True)
        log.info("training run %s ended: %s", job.run, job.state)

    def stop(self) -> TrainingJob | None:
        with self._lock:
            job = self.job
            if job is None or job.ended is not None:
                return job
            if job.stop_requested is None:
                job.stop_requested = time.time()
                (job.out_dir / STOP_FILE).touch()
            return job

    def poll(self) -> dict:
        with self._lock:
            if self.job is None:
                return {"state": "idle", "run": None, "steps_logged": 0, "error": None, "outputs": {}}
            self.job.log.read(self.job.out_dir)
            return self.job.snapshot()

    def steps(self) -> list[dict]:
        with self._lock:
            return list(self.job.log.steps) if self.job else []

    def shutdown(self, wait_s: float = 20.0) -> None:
        """Server exiting: ask a running job to checkpoint and end, wait a little, then make sure it ends."""
        job = self.job
        if job is None or job.ended is not None or not job.alive:
            return
        log.info("stopping training run %s before the server exits", job.run)
        (job.out_dir / STOP_FILE).touch()
        _signal_group(job.pid, signal.SIGTERM)   # the trainer checkpoints on SIGTERM; the guard waits for it
        deadline = time.monotonic() + wait_s
        while job.alive and time.monotonic() < deadline:
            time.sleep(0.2)
        if job.alive:
            _signal_group(job.pid, signal.SIGKILL)
        self.lock_path.unlink(missing_ok=True)

    # -- past runs -----------------------------------------------------------------------------------

    def run_dir(self, run: str) -> Path:
        """The folder of a run named by a request: a direct child of the runs folder holding metrics."""
        if not isinstance(run, str) or not RUN_NAME.match(run):
            raise JobError("There is no such run.")
        folder = self.runs_dir / run
        if folder.resolve().parent != self.runs_dir.resolve() or not (folder / METRICS_FILE).is_file():
            raise JobError("There is no such run.")
        return folder

    def active_run(self) -> str | None:
        job = self.job
        return job.run if job is not None and job.ended is None else None

    def runs(self) -> list[dict]:
        """Every run folder, newest first: name, outcome, steps, last metrics, what it can do."""
        if not self.runs_dir.is_dir():
            return []
        active = self.active_run()
        found = []
        for folder in sorted(self.runs_dir.iterdir(), reverse=True):
            if not folder.is_dir() or not (folder / METRICS_FILE).is_file():
                continue
            logged = RunLog().read(folder)
            config, last, end = logged.config or {}, (logged.steps or [{}])[-1], logged.end or {}
            outcome = "running" if folder.name == active else str(end.get("outcome") or "interrupted")
            has_checkpoint = any(p.is_dir() and not p.name.endswith(".partial") for p in folder.glob("checkpoint-*"))
            found.append({"run": folder.name, "outcome": outcome, "step": last.get("step", 0),
                          "max_steps": config.get("steps"), "bits": config.get("bits"),
                          "loss": last.get("loss"), "cka": last.get("cka"), "beta": last.get("beta"),
                          "teacher": config.get("teacher"), "student": config.get("student"),
                          "outputs": relative_outputs(end, folder),
                          "resumable": outcome in ("stopped", "failed", "interrupted") and has_checkpoint,
                          "comparable": outcome == "finished" or (outcome != "running" and has_checkpoint)})
        return found

    def delete(self, run: str) -> None:
        folder = self.run_dir(run)
        if run == self.active_run():
            raise JobError("This run is still running: stop it first.")
        shutil.rmtree(folder)
        self.version += 1
        log.info("deleted training run %s", run)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _prefer_oom_kill(pid: int) -> None:
    """Ask the kernel to kill the trainer, not the server, when memory runs out (Linux; best effort)."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text("500")
    except OSError:
        pass
