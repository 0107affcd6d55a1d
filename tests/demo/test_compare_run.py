"""demo/compare_run.py and demo/compare_view.py: one comparison in-process, its rendering and its download."""

from __future__ import annotations

import json

import pytest
from PIL import Image

pytest.importorskip("gradio")

from app_server import REPO  # noqa: E402
from demo import compare_view  # noqa: E402
from demo.compare_run import CompareRun, check_labels, markdown_table, parse_variants, write_downloads  # noqa: E402
from demo.families import Family, Variant  # noqa: E402
from demo.model_cache import ModelCache  # noqa: E402


@pytest.fixture(scope="module")
def finished(fixtures_dir):
    from grace.chat import GenerationSettings

    family = Family("dev", [Variant("BF16", str(fixtures_dir / "qwen3vl-tiny-bf16"), "bf16"),
                            Variant("W4", str(fixtures_dir / "qwen3vl-tiny-grace-w4g128-awq"), "int4")])
    image = Image.open(REPO / "assets" / "examples" / "red-circle-blue-square.png").convert("RGB")
    run = CompareRun(ModelCache(2**30), family, ["W4", "BF16"], image, "What | color?",
                     GenerationSettings(max_new_tokens=10)).start()
    for _ in run.updates():
        pass
    return run


def test_every_column_answers_with_confidence_and_memory(finished):
    result = finished.result(with_tokens=True)
    assert result["reference"] == "BF16" and [c["label"] for c in result["columns"]] == ["W4", "BF16"]
    for column in result["columns"]:
        assert column["status"] == "done" and column["kv_cache_bytes"] > 0
        assert len(column["per_token"]) == column["generated_tokens"]
    w4, bf16 = result["columns"]
    assert w4["weight_bytes"] < bf16["weight_bytes"]
    if w4["first_diverging_token"] is not None:
        assert w4["first_diverging_token"] == finished.columns[0].first_divergence + 1   # counted from 1


def test_views_say_what_they_show(finished):
    w4, bf16 = finished.columns
    html = compare_view.confidence_html(bf16)
    assert html.count("class='grace-token'") == sum(1 for p in bf16.pieces() if p) and "least sure: token #" in html
    assert compare_view.confidence_html(w4)
    metrics = compare_view.metrics_markdown(w4, "BF16")
    assert "KV cache" in metrics and "GPU peak" not in metrics          # a CPU run has no GPU figure
    import grace
    seen = grace.seen_as(grace.load(w4.source), finished.image).describe()      # the fixture's own budget
    assert w4.seen_as == seen and seen in metrics and finished.result()["columns"][0]["seen_as"] == seen
    few = type(w4)(**{**w4.__dict__, "token_ids": w4.token_ids[:3], "tokens_per_s": None})
    assert "needs ≥ 8 tokens" in compare_view.metrics_markdown(few, "BF16")
    assert "positions count from 1" in compare_view.LEGEND


def test_the_download_holds_the_whole_comparison(finished, tmp_path):
    paths = write_downloads(finished.result(with_tokens=True), tmp_path / "d")
    data = json.loads(open(paths[0]).read())
    assert data["question"] == "What | color?" and len(data["columns"]) == 2 and data["columns"][0]["per_token"]
    table = open(paths[1]).read()
    assert table == markdown_table(data)
    rows = [line for line in table.splitlines() if line.startswith("| W4 ") or line.startswith("| BF16 ")]
    assert len(rows) == 2 and all(row.count(" | ") == 11 for row in rows)   # the answer's '|' is escaped
    assert "What | color?" in table


def test_variant_lists_from_the_api():
    family = Family("f", [Variant("a", "/a", "bf16"), Variant("b", "/b", "int4", default=False)])
    assert parse_variants("", family) == ["a"] and parse_variants('["b", "a"]', family) == ["b", "a"]
    assert parse_variants("a, b", family) == ["a", "b"]
    with pytest.raises(ValueError, match="JSON list"):
        parse_variants('["a"', family)
    with pytest.raises(KeyError, match="has no variant"):
        check_labels(["zzz"], family)
    with pytest.raises(ValueError, match="At most 4"):
        check_labels(list("abcde"), Family("g", [Variant(x, x, "bf16") for x in "abcde"]))


def test_a_column_finishing_during_a_render_gets_one_more_update(fixtures_dir):
    """The last update is decided before it is yielded: a column that finishes while the caller is rendering
    the previous one is shown finished (the loop used to end there, leaving it 'answering…' on screen)."""
    from grace.chat import GenerationSettings

    family = Family("dev", [Variant("BF16", str(fixtures_dir / "qwen3vl-tiny-bf16"), "bf16"),
                            Variant("W4", str(fixtures_dir / "qwen3vl-tiny-grace-w4g128-awq"), "int4")])
    run = CompareRun(ModelCache(2**30), family, ["BF16", "W4"], Image.new("RGB", (64, 64)), "What?",
                     GenerationSettings(max_new_tokens=4))                 # not started: the test moves the columns
    for column in run.columns:
        column.status = "answering"
    updates = run.updates()
    assert next(updates).final is False
    for column in run.columns:                                             # both finish while that one is drawn
        column.status = "done"
    run._bump()
    last = next(updates)
    assert last.final is True and all(c.status == "done" for c in last.columns)
    with pytest.raises(StopIteration):
        next(updates)
