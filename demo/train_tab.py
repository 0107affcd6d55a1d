"""Train tab: builds the components and wires them to the server's `JobManager` (demo/jobs.py): the form,
the live panels (redrawn by a gr.Timer from metrics.jsonl) and the list of past runs."""

from __future__ import annotations

import dataclasses
import logging

import gradio as gr

import grace
import grace.zoo
from grace.train import PRESETS

from . import charts, train_view, validate
from .families import HUB_FAMILY, TRAINED_PREFIX, ZOO_FAMILY, Registry, Variant, trained_family, training_data_files
from .inputs import passthrough
from .jobs import ACTIVE, JobBusy, JobError, JobManager, TrainRequest
from .settings import Settings
from .train_view import progress_html, status_markdown, thin

log = logging.getLogger(__name__)

BITS = {"W8": 8, "W4": 4, "BF16": 16}
SEP = " › "                 # "family › variant" in the teacher / student lists
HYPER = [("lr", "Learning rate (weights)"), ("scale_lr", "Learning rate (QAT step sizes)"),
         ("tau", "τ (target of the smoothed L_GDKD)"), ("eta", "η (IB controller gain)"),
         ("omega", "ω (R-CKA weight)"), ("temperature", "Distillation temperature")]
DEFAULTS = {f.name: f.default for f in dataclasses.fields(grace.TrainConfig)}   # the one place defaults live
PAPER_PRESET = "qwen3vl-2b-paper"
# recipe values the form does not show but a job takes from the recipe; the job manager owns the rest
# (where checkpoints go, how often, how many are kept)
JOB_OWNED = {"student", "teacher", "out", "resume", "stop_after", "checkpoint_every", "checkpoint_minutes",
             "keep_checkpoints", "num_workers", "log_every", "data", "bits", "steps", *(name for name, _ in HYPER)}


def refuse(message: str) -> gr.Error:
    log.info("refused a training request: %s", message)
    return gr.Error(message, print_exception=False)


class TrainTab:
    def __init__(self, settings: Settings, registry: Registry, manager: JobManager | None = None):
        self.settings = settings
        self.registry = registry
        # the zoo's recipe (zoo.json), read once: default teacher / student, form values and every zoo job's options
        self.zoo_recipe = grace.zoo.train_defaults(settings.zoo_dir)
        self.manager = manager or JobManager(settings.runs_dir)
        self.data_files = training_data_files(settings.allow_local)

    # -- choices --------------------------------------------------------------------------------------

    def model_choices(self) -> dict[str, Variant]:
        """'family › label' -> variant, for every family except trained runs."""
        return {f"{name}{SEP}{variant.label}": variant for name in self.registry.names()
                if not name.startswith(TRAINED_PREFIX) for variant in self.registry.get(name).variants}

    def default_model(self, role: str) -> str | None:
        """The zoo recipe's teacher / student (GRACE BF16, quantized by the job), else the model labelled so, else
        the first BF16 model."""
        choices = self.model_choices()
        wanted = self.zoo_recipe.get(role)
        for key, variant in choices.items():
            if wanted and key.startswith(ZOO_FAMILY) and variant.source == wanted:
                return key
        for key, variant in choices.items():
            if variant.label.startswith(role):
                return key
        return next((k for k, v in choices.items() if v.kind == "bf16"), next(iter(choices), None))

    def data_choices(self) -> list[tuple[str, str]]:
        return ([("shapes v2 (varied sizes, built in)", "shapes-v2"), ("shapes v1 (64×64, built in)", "shapes")]
                + [(f.name, str(f)) for f in self.data_files])

    def recipe(self, student: str | None) -> tuple[str, dict]:
        """(what it is, TrainConfig values) a job with this student starts from: the zoo's own GRACE W4 run for a
        zoo model, the authors' preset for the Qwen3-VL-2B releases, grace.TrainConfig's defaults otherwise."""
        family = (student or "").split(SEP)[0]
        if family == ZOO_FAMILY:
            if self.zoo_recipe:
                return ("the zoo's GRACE W4 run (the authors' recipe scaled to these tiny models; "
                        "assets/zoo/zoo.json)", dict(self.zoo_recipe))
        if family == HUB_FAMILY:
            return (f"preset {PAPER_PRESET}: the authors' Qwen3-VL-2B GRACE recipe "
                    f"(python -m grace train --preset {PAPER_PRESET} --help)", dict(PRESETS[PAPER_PRESET]["values"]))
        return "grace.TrainConfig's defaults", {}

    def form_defaults(self, student: str | None) -> dict:
        """What the form shows for this student: bits, data, steps and the hyper-parameters of its recipe."""
        values = {**DEFAULTS, "steps": 200, "data": "shapes-v2", **self.recipe(student)[1]}
        bits = {v: k for k, v in BITS.items()}.get(values.get("bits"), "W4")
        data = values["data"] if values["data"] in [v for _, v in self.data_choices()] else "shapes-v2"
        return {"bits": bits, "data": data, "steps": min(int(values["steps"]), self.settings.train_max_steps),
                **{name: values[name] for name, _ in HYPER}}

    def recipe_note(self, student: str | None) -> str:
        return f"<small>Recipe: {self.recipe(student)[0]}.</small>"

    def on_student(self, student):
        """The student changed: show its recipe's values."""
        d = self.form_defaults(student)
        return [d["bits"], d["data"], d["steps"], *(d[name] for name, _ in HYPER), self.recipe_note(student)]

    def variant_for(self, source: str | None, role: str) -> Variant | None:
        if not source:
            return None
        known = next((v for v in self.model_choices().values() if v.source == source), None)
        return known or Variant(f"{role} ({str(source).rstrip('/').split('/')[-1]})", source, "bf16")

    # -- actions (UI and API) -------------------------------------------------------------------------

    def control_allowed(self) -> None:
        if not self.settings.train_control:
            raise refuse("Training is view-only on this server (GRACE_TRAIN=view): runs can be watched, not "
                         "started, stopped, resumed or deleted.")

    def start(self, teacher, student, bits, steps, lr, scale_lr, tau, eta, omega, temperature, data) -> dict:
        self.control_allowed()
        models = self.model_choices()
        problems = []
        if teacher not in models:
            problems.append("pick a teacher from the list")
        if student not in models:
            problems.append("pick a student from the list")
        if bits not in BITS:
            problems.append(f"bits must be one of {', '.join(BITS)}")
        if data not in [value for _, value in self.data_choices()]:
            problems.append("data must be 'shapes-v2', 'shapes' or one of the JSON files the operator allowed")
        numbers, problem = validate.training_numbers(steps, lr, scale_lr, tau, eta, omega, temperature,
                                                     self.settings.train_max_steps)
        problems += [problem] if problem else []
        if problems:
            raise refuse("Cannot start training: " + "; ".join(problems) + ".")
        recipe = {k: v for k, v in self.recipe(student)[1].items() if k not in JOB_OWNED and v is not None}
        given = {"teacher": models[teacher].source, "student": models[student].source, "bits": BITS[bits],
                 "data": data, **numbers}
        options = {name.replace("_", "-"): value for name, value in {**recipe, **given}.items()}
        label = "bf16" if BITS[bits] == 16 else f"w{BITS[bits]}"
        describe = {"teacher": models[teacher].label, "student": models[student].label, "bits": BITS[bits],
                    "steps": numbers["steps"], "data": data if data.startswith("shapes") else data.split("/")[-1]}
        return self._launch(TrainRequest(options, label, describe))

    def _launch(self, request: TrainRequest, resume: str | None = None) -> dict:
        try:
            self.manager.start(request, resume=resume)
        except JobBusy as err:
            raise refuse(str(err)) from None
        except OSError:
            log.exception("could not start a training process")
            raise gr.Error("Could not start the training process; the server log has the details.") from None
        return self.manager.poll()

    def stop(self) -> dict:
        self.control_allowed()
        if self.manager.stop() is None:
            raise refuse("There is no training job to stop.")
        return self.manager.poll()

    def status(self) -> dict:
        return self.manager.poll()

    def runs(self) -> list[dict]:
        """`train_runs` API endpoint: the past runs, their models named by label (no server paths)."""
        shown = []
        for record in self.manager.runs():
            teacher, student = (self.variant_for(record[k], k) for k in ("teacher", "student"))
            shown.append({**record, "teacher": teacher.label if teacher else None,
                          "student": student.label if student else None})
        return shown

    def run_record(self, run) -> dict:
        try:
            self.manager.run_dir(run)
        except JobError as err:
            raise refuse(str(err)) from None
        return next(r for r in self.manager.runs() if r["run"] == run)

    def resume(self, run) -> dict:
        """Continue a stopped (or interrupted) run from its last checkpoint to its planned steps."""
        self.control_allowed()
        record = self.run_record(run)
        if not record["resumable"]:
            raise refuse(f"Run {run} cannot be resumed ({record['outcome']}, no checkpoint to continue from).")
        return self._launch(TrainRequest({}, describe={"resume": run}), resume=run)

    def delete(self, run) -> list:
        self.control_allowed()
        try:
            self.manager.delete(run)
        except JobError as err:
            raise refuse(str(err)) from None
        gr.Info(f"Deleted the run {run}.")
        return self.manager.runs()

    def compare_run(self, run):
        """A finished run joins Compare (with its teacher and its student before distillation); a stopped run
        first exports its last checkpoint (a short job that resumes with no steps left) and then can."""
        record = self.run_record(run)
        if record["outcome"] != "finished":
            if not record["comparable"]:
                raise refuse(f"Run {run} has no checkpoint to compare.")
            self.control_allowed()
            self._launch(TrainRequest({"steps": record["step"]}, describe={"export": run, "step": record["step"]}),
                         resume=run)
            gr.Info(f"Exporting the step-{record['step']} checkpoint of {run}; press Compare again when it is done.")
            return gr.skip(), gr.skip()
        folder = self.manager.run_dir(run)
        outputs = {key: str(folder / path) for key, path in record["outputs"].items()}
        family = trained_family(run, outputs, self.variant_for(record["teacher"], "teacher"),
                                self.variant_for(record["student"], "student"), int(record["bits"] or 16))
        if len(family.variants) < 2:
            raise refuse(f"The run {run} left no loadable model.")
        self.registry.add(family)
        gr.Info(f"Added the family '{family.name}' to the Compare tab.")
        return gr.Dropdown(choices=self.registry.names(), value=family.name), gr.Tabs(selected="compare")

    def compare_current(self):
        status = self.manager.poll()
        if status["state"] != "finished":
            raise refuse("No finished run to compare yet.")
        return self.compare_run(status["run"])

    @staticmethod
    def pick_run(event: gr.SelectData):
        return train_view.row_run(event.row_value)

    # -- drawing --------------------------------------------------------------------------------------

    def redraw(self, drawn: dict | None, smoothing: float, log_y: bool):
        """Timer tick: redraw what changed. Returns the panels, buttons, timer, runs table and the 'drawn' marker."""
        status = self.manager.poll()
        marker = {"run": status.get("run"), "n": status.get("steps_logged"), "state": status["state"],
                  "view": [smoothing, log_y], "runs": self.manager.version}
        active = status["state"] in ACTIVE
        if drawn == marker:
            return [gr.skip()] * 10 + [gr.Timer(active=active), drawn]
        steps = thin(self.manager.steps())
        smoothing = min(max(float(smoothing or 0), 0.0), 0.99)
        if not drawn or drawn.get("runs") != marker["runs"] or drawn.get("state") != marker["state"]:
            listed = self.manager.runs()
            runs = [train_view.runs_rows(listed), gr.Dropdown(choices=[r["run"] for r in listed])]
        else:
            runs = [gr.skip(), gr.skip()]
        return [progress_html(status), status_markdown(status), charts.losses_figure(steps, smoothing, bool(log_y)),
                charts.cka_figure(steps, smoothing), charts.ib_figure(steps, smoothing),
                charts.gate_figure(steps, smoothing), gr.Button(visible=status["state"] == "finished"),
                gr.Button(interactive=active and self.settings.train_control), *runs, gr.Timer(active=active), marker]

    def build(self, compare_family: gr.Dropdown, tabs: gr.Tabs) -> None:
        settings, control = self.settings, self.settings.train_control
        # Shown as "label · family" with the family's name up to its first parenthesis, so it fits the box.
        models = [(f"{v.label} · {key.split(SEP)[0].split(' (')[0]}", key) for key, v in self.model_choices().items()]
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=420):
                if not control:
                    gr.Markdown("*View-only: this server shows training runs but does not start them.*")
                teacher = gr.Dropdown(models, value=self.default_model("teacher"), label="Teacher",
                                      elem_id="train-teacher")
                student = gr.Dropdown(models, value=self.default_model("student"), label="Student",
                                      elem_id="train-student")
                first = self.form_defaults(student.value)
                bits = gr.Radio(list(BITS), value=first["bits"], label="Student weights")
                data = gr.Dropdown(self.data_choices(), value=first["data"], label="Training data")
                steps = passthrough(gr.Number(first["steps"], precision=0, minimum=1, maximum=settings.train_max_steps,
                                              label="Steps", elem_id="train-steps"))
                recipe = gr.Markdown(self.recipe_note(student.value), elem_id="train-recipe")
                with gr.Accordion("Hyper-parameters (the student's recipe; the rest of it travels with the job)",
                                  open=False):
                    hyper = [passthrough(gr.Number(first[name], label=label)) for name, label in HYPER]
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="train-start", interactive=control)
                    stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="train-stop")
                to_compare = gr.Button("Compare the trained model", visible=False, elem_id="train-to-compare")
            with gr.Column(scale=3):
                progress = gr.HTML(progress_html({"state": "idle"}), elem_id="train-progress")
                message = gr.Markdown(elem_id="train-message")
                with gr.Row():
                    smoothing = gr.Slider(0, 0.99, value=0.6, step=0.01, label="Smoothing (EMA; raw values faint)",
                                          elem_id="train-smoothing")
                    log_y = gr.Checkbox(False, label="Log scale for losses", elem_id="train-log-scale")
                plots = {}
                for row in (("losses", "cka"), ("ib", "gate")):
                    with gr.Row():
                        for name in row:
                            with gr.Column(min_width=300):
                                plots[name] = gr.Plot(getattr(charts, f"{name}_figure")([]), show_label=False,
                                                      elem_id=f"plot-{name}")
                                gr.Markdown(f"<small>{charts.CAPTIONS[name]}</small>", elem_id=f"caption-{name}")
        with gr.Accordion("Past runs", open=True):
            runs_table = gr.Dataframe(train_view.runs_rows(self.manager.runs()), headers=train_view.RUN_COLUMNS,
                                      interactive=False, elem_id="train-runs")
            with gr.Row():
                run_pick = passthrough(gr.Dropdown([r["run"] for r in self.manager.runs()], label="Run",
                                                   allow_custom_value=True, elem_id="train-run-pick"))
                compare_btn = gr.Button("Compare", elem_id="train-run-compare")
                resume_btn = gr.Button("Resume", elem_id="train-run-resume", interactive=control)
                delete_btn = gr.Button("Delete", variant="stop", elem_id="train-run-delete", interactive=control)
        timer = gr.Timer(1.0, active=False)
        drawn = gr.State(None)
        panel = [progress, message, plots["losses"], plots["cka"], plots["ib"], plots["gate"], to_compare, stop,
                 runs_table, run_pick, timer, drawn]
        job_json = gr.JSON(visible=False, label="status")

        refresh = dict(fn=self.redraw, inputs=[drawn, smoothing, log_y], outputs=panel, api_visibility="private",
                       show_progress="hidden", concurrency_limit=None)
        student.change(self.on_student, student, [bits, data, steps, *hyper, recipe], api_visibility="private")
        timer.tick(**refresh)
        smoothing.release(**refresh)
        log_y.change(**refresh)
        start.click(self.start, [teacher, student, bits, steps, *hyper, data], job_json, api_name="train_start",
                    concurrency_limit=None,
                    api_description="Start a GRACE training job (one per server); returns its status.").success(**refresh)
        stop.click(self.stop, None, job_json, api_name="train_stop", concurrency_limit=None,
                   api_description="Ask the running job to checkpoint and end; returns its status.").success(**refresh)
        to_compare.click(self.compare_current, None, [compare_family, tabs], api_visibility="private")
        compare_btn.click(self.compare_run, run_pick, [compare_family, tabs], api_visibility="private") \
            .success(**refresh)
        resume_btn.click(self.resume, run_pick, job_json, api_name="train_resume", concurrency_limit=None,
                         api_description="Continue a stopped run from its last checkpoint.").success(**refresh)
        delete_btn.click(self.delete, run_pick, job_json, api_name="train_delete", concurrency_limit=None,
                         api_description="Delete a run that is not running.").success(**refresh)
        runs_table.select(self.pick_run, None, run_pick, api_visibility="private")
        self.refresh = refresh

        status_button, runs_button = gr.Button(visible=False), gr.Button(visible=False)
        status_button.click(self.status, None, job_json, api_name="train_status", concurrency_limit=None,
                            api_description="The job's state, step, ETA, last metrics and outputs (run-relative).")
        runs_button.click(self.runs, None, job_json, api_name="train_runs", concurrency_limit=None,
                          api_description="The past runs: outcome, steps, last metrics, resumable / comparable.")
