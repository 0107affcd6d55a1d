"""The zoo (v2): a reduced rebuild proves the pipeline end to end (v1 curriculum, v2 stages, the bits sweep);
the shipped zoo answers the shapes task v2 on its own pictures and on the independent renderer's."""

import json

import pytest
import torch

import grace
from grace.data.shapes import QUESTION_TYPES
from grace.data.shapes_v2 import MAX_PIXELS, MIN_PIXELS
from grace.evaluation import evaluate
from grace.image_budget import pixel_budget
from grace.zoo import DEFAULT_OUT, V1_STAGES, VARIANTS, build_zoo

from alt_shapes import alt_items

KINDS = {"teacher": "bf16", "student": "bf16", "grace-bf16": "bf16", "grace-w8g128": "int8",
         "grace-w4g128-awq": "int4", "ptq-rtn-w4g128": "int4", "ptq-rtn-w8g128": "int8", "qat-ce-w4g128": "int4"}
FORMATS = {"grace-w8g128": "grace-int8", "grace-w4g128-awq": "grace-awq", "ptq-rtn-w4g128": "grace-awq",
           "ptq-rtn-w8g128": "grace-int8", "qat-ce-w4g128": "grace-awq"}
# Chance on the task's question mix: color 1/4, count 1/3, exist 1/2, left 1/3, describe ~0 -> about 0.28.
BETTER_THAN_CHANCE = 0.5


@pytest.mark.slow
def test_reduced_zoo_rebuilds_end_to_end(tmp_path):
    torch.set_num_threads(1)
    record = build_zoo(tmp_path / "zoo", quick=True)
    assert set(record["stages"]) == set(V1_STAGES) | set(VARIANTS)
    for name in VARIANTS:
        folder = tmp_path / "zoo" / name
        loaded = grace.load(folder, device="cpu")
        assert loaded.kind == KINDS[name], name
        assert loaded.format == FORMATS.get(name, "plain"), name
        assert pixel_budget(loaded.processor)[:2] == (MIN_PIXELS, MAX_PIXELS), name     # the budget travels
        card = (folder / "README.md").read_text()
        stage = record["stages"][name]
        assert "grace.load" in card and f"({stage['n']} questions, greedy): {stage['accuracy']:.3f}" in card
        assert "pixel budget 4096..65536" in card and "4-64 visual tokens" in card
        assert stage["n"] == 6 and set(stage["per_type"]) <= set(QUESTION_TYPES)
    controller = record["stages"]["grace-w4g128-awq"]["controller"]
    assert controller["tau"] == pytest.approx((controller["probe_gdkd_median"] * controller["floor"]) ** 0.5, rel=1e-3)
    bf16 = record["stages"]["grace-bf16"]
    legs = (bf16["first_leg"]["controller"], bf16["controller"])       # far from the teacher, then close to it
    assert [leg["tau"] for leg in legs] == [pytest.approx(r * leg["probe_gdkd_median"], rel=1e-3)
                                            for r, leg in zip((0.7, 0.9), legs)]
    assert all(leg["floor"] is None for leg in legs) and bf16["first_leg"]["training"]["steps"] == 4
    assert "first leg: 4 steps" in (tmp_path / "zoo" / "grace-bf16" / "README.md").read_text()
    assert 0.1 <= controller["beta_lowest"] <= controller["beta_highest"] <= 1.0
    sweep = record["sweep"]
    assert {(r["method"], r["bits"]) for r in sweep["rows"]} == {(m, b) for m in ("ptq-rtn", "qat-ce", "qat-grace")
                                                                 for b in (4, 2)}
    assert all(r["n_seeds"] == 2 for r in sweep["rows"] if r["method"] != "ptq-rtn" and r["bits"] == 4)
    by_bits = {r["bits"]: r for r in sweep["rows"] if r["method"] == "ptq-rtn"}
    assert by_bits[2]["container_bytes"] == by_bits[4]["container_bytes"] > by_bits[2]["ideal_bytes"]
    written = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    assert written["stages"]["teacher"]["cpu_s"] > 0 and written["pixel_budget"]["visual_tokens"] == [4, 64]
    # a second build finds every stage done and rebuilds nothing
    again = build_zoo(tmp_path / "zoo", quick=True)
    assert again["stages"]["teacher"]["cpu_s"] == written["stages"]["teacher"]["cpu_s"]
    assert again["sweep"]["rows"] == written["sweep"]["rows"]


SHIPPED = [v for v in VARIANTS if (DEFAULT_OUT / v / "README.md").is_file()]


def test_shipped_zoo_is_small_and_records_its_build():
    if not SHIPPED:
        pytest.skip("assets/zoo has not been built yet")
    size = sum(f.stat().st_size for f in DEFAULT_OUT.rglob("*") if f.is_file())
    assert size <= 40 * 2 ** 20, size
    record = json.loads((DEFAULT_OUT / "zoo.json").read_text())
    assert all(record["stages"][name]["cpu_s"] is not None for name in SHIPPED)
    assert record["sweep"]["rows"] and record["pixel_budget"]["visual_tokens"] == [4, 64]


@pytest.mark.parametrize("name", SHIPPED or [pytest.param("none", marks=pytest.mark.skip("zoo not built yet"))])
def test_shipped_zoo_answers_v2_pictures_better_than_chance(name):
    torch.set_num_threads(1)
    loaded = grace.load(DEFAULT_OUT / name, device="cpu", dtype=torch.float32)
    assert loaded.kind == KINDS[name]
    assert pixel_budget(loaded.processor)[:2] == (MIN_PIXELS, MAX_PIXELS)
    own = evaluate(loaded, "shapes-v2-test", limit=50, progress=False)
    other = evaluate(loaded, alt_items(50, seed=11), progress=False)
    assert own.accuracy > BETTER_THAN_CHANCE, own.per_type
    assert other.accuracy > BETTER_THAN_CHANCE, other.per_type
