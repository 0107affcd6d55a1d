"""Train tab: one GRACE distillation job per server, in its own process, watched through its metrics.jsonl.

The job is `python -m grace train ...` in a new process group: a crash or an out-of-memory kill
there ends the job, never the server. The tab tails metrics.jsonl with a gr.Timer and redraws the
panels; Stop writes DIR/STOP (the trainer checkpoints and ends within seconds) and escalates to
SIGTERM, then SIGKILL, if the process does not end.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gradio as gr

from . import charts
from .families import TRAINED_PREFIX, Registry, Variant, trained_family, training_data_files
from .settings import REPO_ROOT, Settings

log = logging.getLogger(__name__)

TRAIN_COMMAND = [sys.executable, "-m", "grace", "train"]
BITS = {"W8": 8, "W4": 4, "BF16": 16}
SEP = " › "                 # "family › variant" in the teacher / student lists
STOP_TERM_AFTER_S = 15.0    # after Stop: SIGTERM if the trainer has not ended by then ...
STOP_KILL_AFTER_S = 30.0    # ... and SIGKILL after this
ACTIVE = ("starting", "running", "stopping")
# Form defaults when grace.trainer cannot be read; normally its TrainConfig's own defaults are shown.
FALLBACK_DEFAULTS = {"lr": 2e-5, "scale_lr": 1e-4, "tau": 1.0, "eta": 0.01, "omega": 1.0, "temperature": 2.0}


def trainer_defaults() -> dict[str, float]:
    try:
        import dataclasses

        from grace.train import TrainConfig

        fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        return {name: float(fields.get(name, value)) for name, value in FALLBACK_DEFAULTS.items()}
    except Exception as err:  # the form still works with the documented defaults
        log.warning("could not read grace.trainer's defaults (%s); using built-in ones", err)
        return dict(FALLBACK_DEFAULTS)


class JobBusy(RuntimeError):
    """A job is already running on this server."""


@dataclass
class TrainRequest:
    teacher: Variant
    student: Variant
    bits: int
    steps: int
    data: str
    lr: float
    scale_lr: float
    tau: float
    eta: float
    omega: float
    temperature: float

    def argv(self, out_dir: Path) -> list[str]:
        options = {"teacher": self.teacher.source, "student": self.student.source, "bits": self.bits,
                   "steps": self.steps, "data": self.data, "out": out_dir, "lr": self.lr, "scale-lr": self.scale_lr,
                   "tau": self.tau, "eta": self.eta, "omega": self.omega, "temperature": self.temperature}
        return [part for name, value in options.items() for part in (f"--{name}", str(value))]


@dataclass
class TrainingJob:
    run: str
    out_dir: Path
    request: TrainRequest
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    config: dict | None = None
    steps: list[dict] = field(default_factory=list)
    end: dict | None = None
    exit_code: int | None = None
    stop_requested: float | None = None
    _offset: int = 0
    _partial: bytes = b""

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.out_dir / "train.log"

    def read_new(self) -> None:
        """Parse the complete lines appended to metrics.jsonl since the last call."""
        try:
            with open(self.metrics_path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()   # a line still being written
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: skipping a line that is not JSON", self.metrics_path)
                continue
            event = record.get("event")
            if event == "step":
                self.steps.append(record)
            elif event == "config":
                self.config = record
            elif event == "end":
                self.end = record

    @property
    def state(self) -> str:
        if self.exit_code is None:
            if self.stop_requested:
                return "stopping"
            return "running" if self.steps else "starting"
        if self.end:
            return str(self.end.get("outcome", "failed"))
        return "stopped" if self.stop_requested and self.exit_code in (0, -signal.SIGTERM) else "failed"

    def error(self) -> str | None:
        if self.end and self.end.get("error"):
            return str(self.end["error"])
        if self.exit_code is None or self.end:
            return None
        if self.state == "stopped":
            return None
        if self.exit_code in (-signal.SIGKILL, 137):
            why = "was killed (SIGKILL); most often the machine ran out of memory"
        else:
            why = f"exited with code {self.exit_code}"
        return f"The training process {why} before finishing.{self.log_tail()}"

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return "\nLast lines of its log:\n" + "\n".join(text) if text else ""

    def snapshot(self) -> dict:
        last = self.steps[-1] if self.steps else {}
        return {"state": self.state, "run": self.run, "out_dir": str(self.out_dir), "step": last.get("step", 0),
                "max_steps": last.get("max_steps", self.request.steps), "eta_s": last.get("eta_s"),
                "tokens_per_s": last.get("tokens_per_s"), "elapsed_s": round(time.time() - self.started, 1),
                "steps_logged": len(self.steps), "last": last, "error": self.error(),
                "outputs": (self.end or {}).get("outputs") or {}, "exit_code": self.exit_code,
                "request": {**asdict(self.request), "teacher": self.request.teacher.label,
                            "student": self.request.student.label}}


class JobManager:
    """Starts, watches and stops the server's single training job."""

    def __init__(self, runs_dir: Path, command: list[str] | None = None):
        self.runs_dir = Path(runs_dir)
        self.command = list(command or TRAIN_COMMAND)
        self._lock = threading.Lock()
        self.job: TrainingJob | None = None
        atexit.register(self.shutdown)

    def start(self, request: TrainRequest) -> TrainingJob:
        with self._lock:
            if self.job is not None and self.job.exit_code is None:
                raise JobBusy(f"A training job is already running on this server (run {self.job.run}, "
                              f"{self.job.state}). Only one job runs at a time: wait for it to end or stop it.")
            run = time.strftime("%Y%m%d-%H%M%S") + f"-{'bf16' if request.bits == 16 else f'w{request.bits}'}"
            out_dir = self.runs_dir / run
            out_dir.mkdir(parents=True, exist_ok=False)
            env = {**os.environ, "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
            with open(out_dir / "train.log", "wb") as log_file:
                process = subprocess.Popen(self.command + request.argv(out_dir), cwd=REPO_ROOT, env=env,
                                           stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                           start_new_session=True)   # own process group: signals reach it all
            _prefer_oom_kill(process.pid)
            self.job = TrainingJob(run, out_dir, request, process)
            threading.Thread(target=self._watch, args=(self.job,), daemon=True, name=f"train-{run}").start()
            log.info("started training run %s (pid %d)", run, process.pid)
            return self.job

    def _watch(self, job: TrainingJob) -> None:
        """Wait for the process; after Stop, escalate to SIGTERM / SIGKILL if it does not end."""
        while (code := job.process.poll()) is None:
            if job.stop_requested:
                waited = time.time() - job.stop_requested
                if waited > STOP_KILL_AFTER_S:
                    _signal_group(job.process, signal.SIGKILL)
                elif waited > STOP_TERM_AFTER_S:
                    _signal_group(job.process, signal.SIGTERM)
            time.sleep(0.25)
        with self._lock:
            job.read_new()
            job.exit_code = code
        log.info("training run %s ended: %s", job.run, job.state)

    def stop(self) -> TrainingJob | None:
        with self._lock:
            job = self.job
            if job is None or job.exit_code is not None:
                return job
            if job.stop_requested is None:
                job.stop_requested = time.time()
                (job.out_dir / "STOP").touch()
            return job

    def poll(self) -> dict:
        with self._lock:
            if self.job is None:
                return {"state": "idle", "run": None, "steps_logged": 0, "error": None, "outputs": {}}
            self.job.read_new()
            return self.job.snapshot()

    def steps(self) -> list[dict]:
        with self._lock:
            return list(self.job.steps) if self.job else []

    def shutdown(self) -> None:
        """Server exiting: ask a running job to checkpoint and end."""
        job = self.job
        if job is not None and job.process.poll() is None:
            (job.out_dir / "STOP").touch()
            _signal_group(job.process, signal.SIGTERM)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _prefer_oom_kill(pid: int) -> None:
    """Ask the kernel to kill the trainer, not the server, when memory runs out (Linux; best effort)."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text("500")
    except OSError:
        pass


# -- the tab --------------------------------------------------------------------------------------------

def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m {seconds % 60:02d}s"


def progress_html(status: dict) -> str:
    state = status.get("state", "idle")
    if state == "idle":
        return "<div class='grace-progress-text'>No training job yet. Fill in the form and press Start.</div>"
    step, total = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    share = min(step / total, 1.0) if total else 0.0
    color = {"failed": "#dc2626", "stopped": "#d97706", "finished": "#16a34a"}.get(state, "#2563eb")
    speed = status.get("tokens_per_s")
    last = status.get("last") or {}
    parts = [f"<b>{state}</b>", f"run <code>{status.get('run')}</code>", f"step {step} / {total or '?'}",
             f"ETA {_duration(status.get('eta_s'))}" if state in ACTIVE else f"took {_duration(status.get('elapsed_s'))}",
             f"{speed:,.0f} tokens/s" if isinstance(speed, (int, float)) else "– tokens/s"]
    if isinstance(last.get("loss"), (int, float)):
        parts.append(f"loss {last['loss']:.4g}")
    if last.get("nonfinite"):
        parts.append(f"<span style='color:#dc2626'>{last['nonfinite']} non-finite steps skipped</span>")
    return (f"<div style='background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden'>"
            f"<div id='train-progress-bar' style='width:{share:.1%};background:{color};height:100%'></div></div>"
            f"<div class='grace-progress-text' style='margin-top:6px'>{' · '.join(parts)}</div>")


def status_markdown(status: dict) -> str:
    state = status.get("state", "idle")
    if status.get("error"):
        return f"**Training {state}.**\n\n```\n{status['error']}\n```"
    if state == "finished":
        return "**Training finished.** Press *Compare the trained model* to try it in the Compare tab."
    if state == "stopped":
        where = (status.get("outputs") or {}).get("checkpoint") or status.get("out_dir")
        return (f"**Training stopped** at step {status.get('step', 0)}; the last checkpoint was kept in "
                f"`{where}`. Continue it with `python -m grace train --resume {status.get('out_dir')}`.")
    if state == "stopping":
        return "*Stopping: the trainer is writing its checkpoint…*"
    if state in ("starting", "running"):
        return "*Training… (the panels refresh every second)*"
    return ""


def thin(steps: list[dict], most: int = 1000) -> list[dict]:
    """At most about `most` evenly spread step records (and the last), so long runs redraw cheaply."""
    if len(steps) <= most:
        return steps
    every = -(-len(steps) // most)
    return steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else [])


class TrainTab:
    def __init__(self, settings: Settings, registry: Registry, manager: JobManager | None = None):
        self.settings = settings
        self.registry = registry
        self.manager = manager or JobManager(settings.runs_dir)
        self.data_files = training_data_files(settings.allow_local)

    # -- choices --------------------------------------------------------------------------------------

    def model_choices(self) -> dict[str, Variant]:
        """'family › label' -> variant, for every family except trained runs."""
        choices = {}
        for name in self.registry.names():
            if name.startswith(TRAINED_PREFIX):
                continue
            for variant in self.registry.get(name).variants:
                choices[f"{name}{SEP}{variant.label}"] = variant
        return choices

    def default_model(self, role: str) -> str | None:
        """The zoo's teacher / student, else the first BF16 model."""
        choices = self.model_choices()
        for key, variant in choices.items():
            if variant.label.startswith(role):
                return key
        return next((k for k, v in choices.items() if v.kind == "bf16"), next(iter(choices), None))

    def data_choices(self) -> list[tuple[str, str]]:
        return [("shapes (synthetic, built in)", "shapes")] + [(f.name, str(f)) for f in self.data_files]

    # -- actions (UI and API) -------------------------------------------------------------------------

    def start(self, teacher, student, bits, steps, lr, scale_lr, tau, eta, omega, temperature, data) -> dict:
        models = self.model_choices()
        problems = []
        if teacher not in models:
            problems.append(f"unknown teacher {teacher!r}")
        if student not in models:
            problems.append(f"unknown student {student!r}")
        if bits not in BITS:
            problems.append(f"bits must be one of {', '.join(BITS)}")
        if data not in [value for _, value in self.data_choices()]:
            problems.append("data must be 'shapes' or one of the JSON files the operator allowed")
        try:
            steps = int(steps)
            if not 1 <= steps <= self.settings.train_max_steps:
                problems.append(f"steps must be between 1 and {self.settings.train_max_steps}")
            numbers = [float(x) for x in (lr, scale_lr, tau, eta, omega, temperature)]
            if not all(math.isfinite(x) for x in numbers) or min(numbers[0], numbers[1], numbers[5]) <= 0:
                problems.append("learning rates and temperature must be positive; τ, η, ω finite numbers")
        except (TypeError, ValueError):
            problems.append("steps, learning rates, τ, η, ω and temperature must be numbers")
        if problems:
            raise gr.Error("Cannot start training: " + "; ".join(problems) + ".")
        request = TrainRequest(models[teacher], models[student], BITS[bits], steps, data, *numbers)
        try:
            self.manager.start(request)
        except JobBusy as err:
            raise gr.Error(str(err)) from None
        except OSError as err:
            raise gr.Error(f"Could not start the training process: {err}") from None
        return self.manager.poll()

    def stop(self) -> dict:
        if self.manager.stop() is None:
            raise gr.Error("There is no training job to stop.")
        return self.manager.poll()

    def status(self) -> dict:
        return self.manager.poll()

    @staticmethod
    def has_models(status: dict) -> bool:
        outputs = status.get("outputs") or {}
        return any(key in ("final", "export") and path and (Path(path) / "config.json").is_file()
                   for key, path in outputs.items())

    def to_compare(self):
        status = self.manager.poll()
        job = self.manager.job
        if job is None or status["state"] in ACTIVE or not self.has_models(status):
            raise gr.Error("No finished run with a trained model to compare yet (a stopped run keeps a training "
                           "checkpoint, which can be resumed but not loaded).")
        family = trained_family(job.run, status["outputs"], job.request.teacher, job.request.bits)
        if len(family.variants) < 2:
            raise gr.Error(f"The run {job.run} left no loadable checkpoint ({status['outputs']}).")
        self.registry.add(family)
        gr.Info(f"Added the family '{family.name}' to the Compare tab.")
        return gr.Dropdown(choices=self.registry.names(), value=family.name), gr.Tabs(selected="compare")

    # -- drawing --------------------------------------------------------------------------------------

    def redraw(self, drawn: dict | None):
        """Timer tick: redraw what changed. Returns the panels, buttons, timer and the new 'drawn' marker."""
        status = self.manager.poll()
        marker = {"run": status.get("run"), "n": status.get("steps_logged"), "state": status["state"]}
        active = status["state"] in ACTIVE
        if drawn == marker:
            return [gr.skip()] * 8 + [gr.Timer(active=active), drawn]
        steps = thin(self.manager.steps())
        finished_with_outputs = not active and status["state"] != "idle" and self.has_models(status)
        return [progress_html(status), status_markdown(status), charts.losses_figure(steps),
                charts.cka_figure(steps), charts.ib_figure(steps), charts.gate_figure(steps),
                gr.Button(visible=finished_with_outputs), gr.Button(interactive=active),
                gr.Timer(active=active), marker]

    def build(self, compare_family: gr.Dropdown, tabs: gr.Tabs) -> None:
        settings = self.settings
        models = [(f"{v.label} ({key.split(SEP)[0]})", key) for key, v in self.model_choices().items()]
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                teacher = gr.Dropdown(models, value=self.default_model("teacher"), label="Teacher",
                                      elem_id="train-teacher")
                student = gr.Dropdown(models, value=self.default_model("student"), label="Student",
                                      elem_id="train-student")
                bits = gr.Radio(list(BITS), value="W4", label="Student weights")
                data = gr.Dropdown(self.data_choices(), value="shapes", label="Training data")
                steps = gr.Number(200, precision=0, minimum=1, maximum=settings.train_max_steps, label="Steps",
                                  elem_id="train-steps")
                defaults = trainer_defaults()
                with gr.Accordion("Hyper-parameters", open=False):
                    lr = gr.Number(defaults["lr"], label="Learning rate (weights)")
                    scale_lr = gr.Number(defaults["scale_lr"], label="Learning rate (QAT step sizes)")
                    tau = gr.Number(defaults["tau"], label="τ (target of the smoothed L_GDKD)")
                    eta = gr.Number(defaults["eta"], label="η (IB controller gain)")
                    omega = gr.Number(defaults["omega"], label="ω (R-CKA weight)")
                    temperature = gr.Number(defaults["temperature"], label="Distillation temperature")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="train-start")
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="train-stop")
                to_compare = gr.Button("Compare the trained model", visible=False, elem_id="train-to-compare")
            with gr.Column(scale=3):
                progress = gr.HTML(progress_html({"state": "idle"}), elem_id="train-progress")
                message = gr.Markdown(elem_id="train-message")
                with gr.Row():
                    losses = gr.Plot(charts.losses_figure([]), label="Losses", show_label=False, elem_id="plot-losses")
                    cka = gr.Plot(charts.cka_figure([]), label="CKA alignment", show_label=False, elem_id="plot-cka")
                with gr.Row():
                    ib = gr.Plot(charts.ib_figure([]), label="IB controller", show_label=False, elem_id="plot-ib")
                    gate = gr.Plot(charts.gate_figure([]), label="Confidence gate", show_label=False, elem_id="plot-gate")
        timer = gr.Timer(1.0, active=False)
        drawn = gr.State(None)
        panel = [progress, message, losses, cka, ib, gate, to_compare, stop, timer, drawn]
        job_json = gr.JSON(visible=False, label="status")

        refresh = dict(fn=self.redraw, inputs=[drawn], outputs=panel, api_visibility="private",
                       show_progress="hidden", concurrency_limit=None)
        timer.tick(**refresh)
        start.click(self.start, [teacher, student, bits, steps, lr, scale_lr, tau, eta, omega, temperature, data], job_json,
                    api_name="train_start", concurrency_limit=None,
                    api_description="Start a GRACE training job (one per server); returns its status.") \
            .success(**refresh)
        stop.click(self.stop, None, job_json, api_name="train_stop", concurrency_limit=None,
                   api_description="Ask the running job to checkpoint and end; returns its status.") \
            .success(**refresh)
        to_compare.click(self.to_compare, None, [compare_family, tabs], api_visibility="private")
        self.refresh = refresh

        status_button = gr.Button(visible=False)
        status_button.click(self.status, None, job_json, api_name="train_status", concurrency_limit=None,
                            api_description="The job's state, step, ETA, last metrics and output checkpoints.")
