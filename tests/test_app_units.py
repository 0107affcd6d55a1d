"""The app's parts without a server: input checks, settings, families, the model cache, the training job runner."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

pytest.importorskip("gradio")

from app_server import REPO  # noqa: E402
from demo import charts, families, settings, validate  # noqa: E402
from demo.model_cache import CacheError, ModelCache  # noqa: E402
from demo.train_tab import JobBusy, JobManager, TrainingJob, TrainRequest, thin  # noqa: E402

FAKE_TRAINER = Path(__file__).with_name("app_fake_trainer.py")


# -- validate ---------------------------------------------------------------------------------------------

def test_open_image_accepts_a_normal_image(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(path)
    image = validate.open_image(path, max_pixels=10_000)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_open_image_refuses_bad_files(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(validate.InvalidInput, match="not an image"):
        validate.open_image(text, 10_000)
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(big)
    with pytest.raises(validate.InvalidInput, match="too large: 200x100"):
        validate.open_image(big, 10_000)
    photo = tmp_path / "photo.jpg"
    Image.effect_noise((256, 256), 50).convert("RGB").save(photo, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photo.read_bytes()[:2000])
    with pytest.raises(validate.InvalidInput, match="truncated"):
        validate.open_image(cut, 10**6)


def test_question_and_generation_checks():
    assert validate.check_question("  What?  ", 10) == "What?"
    with pytest.raises(validate.InvalidInput, match="type a question"):
        validate.check_question("", 10)
    with pytest.raises(validate.InvalidInput, match="too long"):
        validate.check_question("x" * 11, 10)
    assert validate.check_generation(16, 0.7, 0.9, limit=64) == (16, 0.7, 0.9)
    for bad in [(0, 0.7, 0.9), (65, 0.7, 0.9), (8, 0, 0.9), (8, 0.7, 1.5), (8, float("nan"), 0.9), ("x", 1, 1)]:
        with pytest.raises(validate.InvalidInput):
            validate.check_generation(*bad, limit=64)


# -- settings ---------------------------------------------------------------------------------------------

def test_settings_from_environment():
    s = settings.Settings.from_env({"GRACE_CACHE_BYTES": "2GiB", "GRACE_AUTH": "ann:secret,bob:pw",
                                    "SPACE_ID": "someone/grace", "GRACE_FAMILIES": '{"mine": {"a": "/m/a"}}',
                                    "GRACE_ALLOW_LOCAL": "/data/one:/data/two", "GRACE_TRAIN": "0"})
    assert s.cache_bytes == 2 * 2**30
    assert s.auth == [("ann", "secret"), ("bob", "pw")]
    assert s.host == "0.0.0.0" and s.port == 7860 and not s.share and not s.train
    assert s.families == {"mine": {"a": "/m/a"}}
    assert s.allow_local == [Path("/data/one"), Path("/data/two")]
    assert settings.Settings.from_env({}).host == "127.0.0.1"


@pytest.mark.parametrize("env", [{"GRACE_CACHE_BYTES": "lots"}, {"GRACE_AUTH": "nopassword"},
                                 {"GRACE_FAMILIES": "{not json"}, {"GRACE_FAMILIES": '{"x": 3}'},
                                 {"GRACE_HUB": "maybe"}, {"GRACE_PORT": "-1"}])
def test_bad_settings_are_reported(env):
    with pytest.raises(settings.SettingsError):
        settings.Settings.from_env(env)


def test_family_option_and_sizes():
    assert settings.parse_family_option("mine=fp:/x/bf16,q4:/x/w4-awq") == ("mine", {"fp": "/x/bf16", "q4": "/x/w4-awq"})
    with pytest.raises(settings.SettingsError):
        settings.parse_family_option("mine")
    assert settings.parse_bytes("6e9") == 6_000_000_000 and settings.parse_bytes("500MB") == 500_000_000


# -- families ---------------------------------------------------------------------------------------------

def test_registry_falls_back_to_the_fixtures(fixtures_dir, tmp_path):
    s = settings.Settings(zoo_dir=tmp_path / "no-zoo", fixtures_dir=fixtures_dir, hub="off",
                          families={"mine": {"int4": str(fixtures_dir / "qwen3vl-tiny-grace-w4g128-awq")}},
                          allow_local=[fixtures_dir])
    registry = families.build_registry(s)
    assert registry.default == families.DEV_FAMILY
    dev = registry.get(families.DEV_FAMILY)
    assert dev.default_labels == ["BF16", "W8G128 (QAT)", "W4G128-AWQ"]
    assert "random weights" in dev.note
    assert registry.get("mine").variants[0].kind == "int4"            # read from the checkpoint's layout
    local = registry.get(families.LOCAL_PREFIX + fixtures_dir.name)
    assert {v.kind for v in local.variants} == {"bf16", "int8", "int4"}
    assert dev.reference(["W4G128-AWQ", "BF16"]) == "BF16"
    assert dev.reference(["W4G128-AWQ", "W8G128 (QAT)"]) == "W4G128-AWQ"
    with pytest.raises(KeyError):
        registry.get("/etc")


def test_the_zoo_wins_over_the_fixtures_once_built(fixtures_dir, tmp_path):
    zoo = tmp_path / "zoo"
    for folder in ("teacher", "grace-bf16", "grace-w8g128"):
        (zoo / folder).mkdir(parents=True)
        (zoo / folder / "config.json").write_text("{}")
    s = settings.Settings(zoo_dir=zoo, fixtures_dir=fixtures_dir, hub="off")
    assert families.build_registry(s).names() == [families.DEV_FAMILY]     # W4 column missing: not offered yet
    (zoo / "grace-w4g128-awq").mkdir()
    (zoo / "grace-w4g128-awq" / "config.json").write_text("{}")
    registry = families.build_registry(s)
    assert registry.names() == [families.ZOO_FAMILY]
    assert registry.get(families.ZOO_FAMILY).labels == ["GRACE BF16", "GRACE W8G128", "GRACE W4G128-AWQ", "teacher"]


def test_training_data_comes_only_from_allowed_folders(tmp_path):
    (tmp_path / "sharegpt4v.json").write_text("[]")
    (tmp_path / "notes.txt").write_text("")
    single = tmp_path / "elsewhere.json"
    single.write_text("[]")
    assert families.training_data_files([tmp_path]) == [tmp_path / "elsewhere.json", tmp_path / "sharegpt4v.json"]
    assert families.training_data_files([single]) == [single]
    assert families.training_data_files([tmp_path / "missing"]) == []


def test_hub_family_forced_on_lists_the_releases_and_baseline():
    hub = families.hub_family("on")
    assert [v.source for v in hub.variants if v.default] == [
        "ForeverBlue/Qwen3-VL-2B-GRACE-BF16", "ForeverBlue/Qwen3-VL-2B-GRACE-W8G128",
        "ForeverBlue/Qwen3-VL-2B-GRACE-W4G128-AWQ"]
    assert [v.source for v in hub.variants if not v.default] == [
        "Qwen/Qwen3-VL-2B-Instruct", "Vishva007/Qwen3-VL-2B-Instruct-W4A16-AutoRound-GPTQ"]
    assert families.hub_family("off") is None


def test_trained_family_keeps_only_loadable_outputs(fixtures_dir, tmp_path):
    teacher = families.Variant("BF16", str(fixtures_dir / "qwen3vl-tiny-bf16"), "bf16")
    outputs = {"metrics": str(tmp_path / "metrics.jsonl"), "checkpoint": str(tmp_path / "checkpoint-3"),
               "final": str(fixtures_dir / "qwen3vl-tiny-grace-w4g128-qat"),
               "export": str(fixtures_dir / "qwen3vl-tiny-grace-w4g128-awq")}
    family = families.trained_family("run1", outputs, teacher, bits=4)
    assert family.name == "trained: run1"
    assert [(v.label, v.kind) for v in family.variants] == [
        ("teacher: BF16", "bf16"), ("trained W4G128 (QAT release)", "int4"), ("trained W4G128-AWQ", "int4")]


# -- model cache ------------------------------------------------------------------------------------------

class FakeLoads:
    """Stands in for grace.load: a 'model' holds as many bytes as its folder's weights file (or `size`)."""

    def __init__(self, size: int = 100, delay: float = 0.0):
        self.size, self.delay, self.calls = size, delay, []

    def __call__(self, source):
        self.calls.append(source)
        time.sleep(self.delay)
        weights = Path(source) / "model.safetensors"
        return SimpleNamespace(source=source, weight_bytes=weights.stat().st_size if weights.is_file() else self.size)


def checkpoints(tmp_path: Path, **sizes: int) -> dict[str, str]:
    """Folders whose model.safetensors has the given size: what the cache reserves before loading."""
    folders = {}
    for name, size in sizes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * size)
        folders[name] = str(tmp_path / name)
    return folders


def test_cache_evicts_least_recently_used_within_its_budget(tmp_path):
    models = checkpoints(tmp_path, a=100, b=100, c=100)
    loads = FakeLoads()
    cache = ModelCache(250, load=loads)
    for name in ["a", "b", "a", "c"]:          # "a" was used after "b": "b" is the one to go
        with cache.use(models[name]) as model:
            assert model.source == models[name]
            assert cache.used_bytes <= 250
    assert [s for s, _, _ in cache.held()] == [models["a"], models["c"]]
    assert loads.calls == [models["a"], models["b"], models["c"]]
    assert cache.evictions == 1


def test_cache_loads_a_model_once_for_concurrent_users():
    loads = FakeLoads(delay=0.3)
    cache = ModelCache(1000, load=loads)
    seen = []

    def user():
        with cache.use("org/shared") as model:
            seen.append(model)

    threads = [threading.Thread(target=user) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads.calls == ["org/shared"] and len({id(m) for m in seen}) == 1


def test_cache_never_evicts_a_model_in_use_and_refuses_what_cannot_fit(tmp_path):
    models = checkpoints(tmp_path, a=100, b=100, huge=5000)
    cache = ModelCache(150, load=FakeLoads(), wait_s=0.5)
    with cache.use(models["a"]):
        with pytest.raises(CacheError, match="no room"):
            with cache.use(models["b"]):
                pass
        assert cache.is_loaded(models["a"])
    with cache.use(models["b"]):                 # "a" is idle now and makes room
        assert not cache.is_loaded(models["a"])
    with pytest.raises(CacheError, match="more than the whole model cache budget"):
        with cache.use(models["huge"]):
            pass


def test_a_model_of_unknown_size_is_not_kept_past_the_budget():
    cache = ModelCache(150, load=FakeLoads(size=100))      # Hub repo ids: size known only once loaded
    with cache.use("org/a"), cache.use("org/b"):           # both in use: over budget only while answering
        assert cache.used_bytes == 200
    assert cache.used_bytes <= 150


def test_cache_load_failures_reach_the_caller_and_leave_no_trace():
    def broken(source):
        from grace.errors import GraceLoadError

        raise GraceLoadError(f"{source} is corrupt")

    cache = ModelCache(1000, load=broken)
    with pytest.raises(Exception, match="corrupt"):
        with cache.use("x"):
            pass
    assert cache.held() == [] and cache.used_bytes == 0


# -- training jobs ----------------------------------------------------------------------------------------

def request(steps: int = 5) -> TrainRequest:
    model = families.Variant("m", "/models/m", "bf16")
    return TrainRequest(model, model, 4, steps, "shapes", 2e-5, 1e-4, 1.0, 0.01, 1.0, 2.0)


def fake_manager(tmp_path: Path, mode: str) -> JobManager:
    return JobManager(tmp_path / "runs", command=[sys.executable, str(FAKE_TRAINER), mode])


def wait_until_ended(manager: JobManager, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (status := manager.poll())["state"] in ("starting", "running", "stopping"):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status


def test_job_runs_to_the_end_and_only_one_at_a_time(tmp_path):
    manager = fake_manager(tmp_path, "finish")
    job = manager.start(request(steps=8))
    assert manager.poll()["request"]["bits"] == 4
    with pytest.raises(JobBusy, match="already running"):
        manager.start(request())
    status = wait_until_ended(manager)
    assert status["state"] == "finished" and status["error"] is None
    assert [s["step"] for s in manager.steps()] == list(range(1, 9))
    args = json.loads((job.out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert args["bits"] == "4" and args["scale-lr"] == "0.0001" and args["out"] == str(job.out_dir)
    manager.start(request())                       # the next job may start once this one ended
    wait_until_ended(manager)


def test_a_job_killed_mid_run_is_reported_as_failed(tmp_path):
    manager = fake_manager(tmp_path, "die")
    manager.start(request(steps=10))
    status = wait_until_ended(manager)
    assert status["state"] == "failed"
    assert "killed (SIGKILL)" in status["error"] and "out of memory" in status["error"]
    assert "about to be killed" in status["error"]            # the log's last lines are shown
    assert status["steps_logged"] == 2


def test_stop_writes_the_stop_file_and_escalates_when_ignored(tmp_path, monkeypatch):
    manager = fake_manager(tmp_path, "finish")
    manager.start(request(steps=200))
    while manager.poll()["steps_logged"] < 1:
        time.sleep(0.05)
    manager.stop()
    status = wait_until_ended(manager, timeout=10)
    assert status["state"] == "stopped" and status["outputs"]["checkpoint"]

    import demo.train_tab as train_tab

    monkeypatch.setattr(train_tab, "STOP_TERM_AFTER_S", 0.5)
    monkeypatch.setattr(train_tab, "STOP_KILL_AFTER_S", 1.5)
    stubborn = fake_manager(tmp_path / "2", "stubborn")
    stubborn.start(request(steps=500))
    stubborn.stop()
    status = wait_until_ended(stubborn, timeout=15)
    assert stubborn.job.exit_code == -signal.SIGKILL
    assert status["state"] == "failed" and "SIGKILL" in status["error"]


def test_metrics_tail_skips_bad_and_half_written_lines(tmp_path):
    job = TrainingJob("r", tmp_path, request(), process=None)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "config"}\nnot json\n{"event": "step", "step": 1}\n{"event": "step", "st')
    job.read_new()
    assert job.config == {"event": "config"} and [s["step"] for s in job.steps] == [1]
    with open(path, "a") as f:
        f.write('ep": 2}\n')
    job.read_new()
    assert [s["step"] for s in job.steps] == [1, 2]


def test_long_runs_are_thinned_for_drawing():
    steps = [{"step": i} for i in range(1, 5001)]
    drawn = thin(steps)
    assert len(drawn) <= 1001 and drawn[0]["step"] == 1 and drawn[-1]["step"] == 5000
    assert thin(steps[:10]) == steps[:10]


# -- charts -----------------------------------------------------------------------------------------------

def test_charts_draw_with_and_without_data():
    steps = [{"step": i, "loss": 1 / i, "ce": 1, "gdkd": 0.5, "rcka": 0.1, "cka": 0.9, "beta": 1.0, "ema": 0.6,
              "tau": 1.0, "gate_mean": 0.5, "gate_min": 0.1, "gate_max": 0.9} for i in range(1, 5)]
    for draw in (charts.losses_figure, charts.cka_figure, charts.ib_figure, charts.gate_figure):
        assert draw([]).layout.annotations            # "no steps yet"
        figure = draw(steps)
        assert figure.data and all(len(trace.x) == 4 for trace in figure.data)
    ib = charts.ib_figure(steps)
    assert {t.name for t in ib.data} == {"EMA of L_GDKD", "τ (target)", "β"}
    columns = [{"label": "BF16", "weight_bytes": 2e6, "peak_bytes": 3e6, "tokens_per_s": 10.0, "ttft_s": 0.1,
                "total_s": 1.0}]
    assert len(charts.compare_figure(columns).data) == 5


def test_example_images_exist_and_are_valid():
    examples = sorted((REPO / "assets" / "examples").glob("*.png"))
    assert len(examples) >= 3
    for path in examples:
        assert validate.open_image(path, 10**6).size == (256, 256)
