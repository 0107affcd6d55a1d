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

from grace.train.metrics import METRICS_FILE, STOP_FILE

from .job_guard import STOP_KILL_AFTER_S, STOP_TERM_AFTER_S
from .processes import prefer_oom_kill, signal_group, group_alive, is_guard_of, process_alive
from .run_files import LOG_FILE, RunLog, describe_run, log_tail, plain, relative_outputs
from .settings import REPO_ROOT

log = logging.getLogger(__name__)

TRAIN_COMMAND = [sys.executable, "-m", "grace", "train"]
GUARD_COMMAND = [sys.executable, "-m", "demo.job_guard"]
LOCK_FILE = "running-job.json"      # in the runs folder, while a job of this app runs
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
            return "The trainer reported: " + plain(self.log.end["error"])
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
        if not (group_alive(pid) and (not process_alive(pid) or is_guard_of(pid, run_dir / STOP_FILE))):
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
            prefer_oom_kill(process.pid)
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
                    signal_group(job.pid, signal.SIGKILL)
                elif waited > STOP_TERM_AFTER_S:
                    signal_group(job.pid, signal.SIGTERM)
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
        signal_group(job.pid, signal.SIGTERM)   # the trainer checkpoints on SIGTERM; the guard waits for it
        deadline = time.monotonic() + wait_s
        while job.alive and time.monotonic() < deadline:
            time.sleep(0.2)
        if job.alive:
            signal_group(job.pid, signal.SIGKILL)
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
        return [describe_run(folder, folder.name == active) for folder in sorted(self.runs_dir.iterdir(), reverse=True)
                if folder.is_dir() and (folder / METRICS_FILE).is_file()]

    def delete(self, run: str) -> None:
        folder = self.run_dir(run)
        if run == self.active_run():
            raise JobError("This run is still running: stop it first.")
        shutil.rmtree(folder)
        self.version += 1
        log.info("deleted training run %s", run)


