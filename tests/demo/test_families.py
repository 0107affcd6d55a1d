"""demo/families.py: which models the app offers (never a path from a request)."""

from __future__ import annotations


import pytest

pytest.importorskip("gradio")

from demo import families, settings  # noqa: E402


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
    student = families.Variant("small", str(fixtures_dir / "qwen3vl-tiny-bf16"), "bf16")
    family = families.trained_family("run1", outputs, teacher, student, bits=4)
    assert family.name == "trained: run1"
    assert [(v.label, v.kind) for v in family.variants] == [
        ("teacher: BF16", "bf16"), ("student before distillation: small", "bf16"),
        ("trained W4G128 (QAT release)", "int4"), ("trained W4G128-AWQ", "int4")]
    assert family.reference(family.labels) == "teacher: BF16"


def test_kinds_come_from_the_checkpoints_not_their_names(fixtures_dir, tmp_path):
    """A folder named like INT4 holding a BF16 checkpoint is BF16 (no guessing from names)."""
    misleading = tmp_path / "model-w4-int4-awq"
    misleading.mkdir()
    for f in (fixtures_dir / "qwen3vl-tiny-bf16").iterdir():
        (misleading / f.name).symlink_to(f)
    assert families.detect_kind(str(misleading)) == "bf16"
    assert families.detect_kind(str(fixtures_dir / "qwen3vl-tiny-grace-w8g128-qat")) == "int8"
    assert families.detect_kind(str(tmp_path / "nothing-w4"), fallback="bf16") == "bf16"
