"""demo/train_tab.py: view-only servers refuse every job action; the form's defaults are grace.TrainConfig's."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

import grace  # noqa: E402
from demo.families import build_registry  # noqa: E402
from demo.jobs import JobManager  # noqa: E402
from demo.settings import Settings  # noqa: E402
from demo.train_tab import DEFAULTS, HYPER, TrainTab  # noqa: E402


def tab(tmp_path, fixtures_dir, mode: str) -> TrainTab:
    settings = Settings.from_env({"GRACE_FIXTURES": str(fixtures_dir), "GRACE_ZOO": str(tmp_path / "none"),
                                  "GRACE_HUB": "off", "GRACE_TRAIN": mode, "GRACE_RUNS_DIR": str(tmp_path / "runs")})
    fake = Path(__file__).with_name("app_fake_trainer.py")
    return TrainTab(settings, build_registry(settings),
                    JobManager(settings.runs_dir, command=[sys.executable, str(fake), "finish"]))


def test_view_only_refuses_every_job_action(tmp_path, fixtures_dir):
    view = tab(tmp_path, fixtures_dir, "view")
    model = next(iter(view.model_choices()))
    for action in (lambda: view.start(model, model, "W4", 5, 2e-5, 1e-4, 1, 0.01, 1, 2, "shapes"), view.stop,
                   lambda: view.resume("x"), lambda: view.delete("x")):
        with pytest.raises(gr.Error, match="view-only"):
            action()
    assert view.status()["state"] == "idle" and view.manager.runs() == []


def test_form_defaults_are_the_trainers(tmp_path, fixtures_dir):
    fields = {f.name: f.default for f in dataclasses.fields(grace.TrainConfig)}
    assert all(DEFAULTS[name] == fields[name] for name, _ in HYPER)


def test_malformed_numbers_are_refused_in_plain_words(tmp_path, fixtures_dir):
    control = tab(tmp_path, fixtures_dir, "1")
    model = next(iter(control.model_choices()))
    for steps, lr in (("many", 2e-5), (5, "fast"), (5, float("nan")), (True, 2e-5), (2.5, 2e-5), (5, -1)):
        with pytest.raises(gr.Error) as refused:
            control.start(model, model, "W4", steps, lr, 1e-4, 1, 0.01, 1, 2, "shapes")
        assert "Cannot start training" in str(refused.value) and "Error" not in str(refused.value)


def test_a_stopped_run_is_exported_then_compared_with_its_student(tmp_path, fixtures_dir, monkeypatch):
    import time

    monkeypatch.setenv("FAKE_TRAINER_FINAL", str(fixtures_dir / "qwen3vl-tiny-grace-w8g128-qat"))
    control = tab(tmp_path, fixtures_dir, "1")
    models = control.model_choices()
    teacher, student = list(models)[0], list(models)[1]
    run = control.start(teacher, student, "W8", 200, 2e-5, 1e-4, 1, 0.01, 1, 2, "shapes")["run"]

    def wait(state_ok):
        deadline = time.monotonic() + 30
        while not state_ok(control.status()):
            assert time.monotonic() < deadline, control.status()
            time.sleep(0.1)

    wait(lambda s: s["steps_logged"] >= 2)
    control.stop()
    wait(lambda s: s["state"] == "stopped")
    assert control.compare_run(run) == (gr.skip(), gr.skip())   # first: export the checkpoint (a short job)
    wait(lambda s: s["state"] == "finished")
    dropdown, _ = control.compare_run(run)
    family = control.registry.get(dropdown.value)
    labels = [v.label for v in family.variants]
    assert labels[0].startswith("teacher: ") and labels[1].startswith("student before distillation: ")
    assert family.variants[1].source == models[student].source and labels[2] == "trained W8G128 (QAT release)"
    assert family.variants[2].kind == "int8"


def test_the_zoo_job_starts_from_the_zoos_recipe_and_the_2b_from_the_papers(tmp_path, fixtures_dir, monkeypatch):
    from demo.families import HUB_FAMILY
    from demo.train_tab import PAPER_PRESET, SEP
    from grace.train import PRESETS
    from grace.zoo import DEFAULT_OUT, train_defaults

    settings = Settings.from_env({"GRACE_FIXTURES": str(fixtures_dir), "GRACE_ZOO": str(DEFAULT_OUT), "GRACE_HUB": "off",
                                  "GRACE_TRAIN": "1", "GRACE_RUNS_DIR": str(tmp_path / "runs")})
    control = TrainTab(settings, build_registry(settings), JobManager(settings.runs_dir, command=[sys.executable, "-c", ""]))
    zoo = train_defaults(DEFAULT_OUT)
    student, teacher = control.default_model("student"), control.default_model("teacher")
    models = control.model_choices()
    assert models[student].source == zoo["student"] and models[teacher].source == zoo["teacher"]
    shown = control.form_defaults(student)
    assert shown["data"] == "shapes-v2" and shown["bits"] == "W4" and shown["tau"] == zoo["tau"] and shown["lr"] == zoo["lr"]
    started = []
    monkeypatch.setattr(control.manager, "start", lambda request, resume=None: started.append(request))
    monkeypatch.setattr(control.manager, "poll", lambda: {"state": "starting"})
    control.start(teacher, student, shown["bits"], 30, *(shown[name] for name, _ in HYPER), shown["data"])
    argv = started[0].argv()
    options = dict(zip(argv[::2], argv[1::2]))
    # the form's values, and the recipe's settings the form does not show
    assert options["--steps"] == "30" and options["--data"] == "shapes-v2" and options["--bits"] == "4"
    assert options["--beta-min"] == str(zoo["beta_min"]) and options["--controller-update"] == "last_micro_batch"
    assert options["--min-pixels"] == str(zoo["min_pixels"]) and options["--train-merger"] == "True"
    assert "--checkpoint-every" not in options and "--out" not in options        # the job manager's own
    paper = control.form_defaults(f"{HUB_FAMILY}{SEP}GRACE BF16")
    assert paper["lr"] == PRESETS[PAPER_PRESET]["values"]["lr"] == 1e-5 and paper["tau"] == 3.0
    assert PAPER_PRESET in control.recipe_note(f"{HUB_FAMILY}{SEP}GRACE BF16")
