"""The app's Eval tab: benchmark folders inside operator-allowed paths, variants side by side, progress text."""

import gradio as gr
import pytest

from demo import families, settings
from demo.eval_tab import EvalTab, benchmark_paths
from demo.model_cache import ModelCache

import bench_files as bf


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "benchmarks"
    root.mkdir()
    bf.write_mmbench(root / "MMBench_DEV_EN.tsv")
    bf.write_mmmu(root / "MMMU")
    bf.write_scienceqa(root / "ScienceQA")
    return root


@pytest.fixture
def tab(tmp_path, fixtures_dir, data_root):
    s = settings.Settings(zoo_dir=tmp_path / "no-zoo", fixtures_dir=fixtures_dir, hub="off", allow_local=[data_root])
    return EvalTab(s, families.build_registry(s), ModelCache(2**30, device="cpu"))


def test_benchmark_folders_inside_allowed_paths_are_offered(tab, data_root, tmp_path):
    labels = dict(tab.data_choices())
    assert {"MMBench · MMBench_DEV_EN.tsv", "MMMU · MMMU", "ScienceQA · ScienceQA"} <= set(labels)
    assert str(tmp_path) not in " ".join(labels)                # labels name files, not server folders
    assert benchmark_paths([data_root / "MMMU"]) == [("mmmu", data_root / "MMMU")]


class Progress:
    def __init__(self):
        self.seen = []

    def __call__(self, value, desc=None):
        self.seen.append((value, desc))


def test_variants_side_by_side_with_agreement_and_counts(tab, data_root):
    progress = Progress()
    value = str((data_root / "MMBench_DEV_EN.tsv").resolve())
    table, _, details = tab.run(families.DEV_FAMILY, ["BF16", "W4G128-AWQ"], value, 4, progress=progress)
    assert set(details) == {"BF16", "W4G128-AWQ"} and details["BF16"]["n"] == 4
    assert details["W4G128-AWQ"]["versus"]["reference"] == "BF16"
    assert 0.0 <= details["W4G128-AWQ"]["versus"]["agreement"] <= 1.0
    headers = table.headers if hasattr(table, "headers") else table.value["headers"]
    assert headers[4] == "same answer as BF16" and "counting (n=2)" in headers and "color_attribute (n=1)" in headers
    descs = [d for _, d in progress.seen]
    assert "variant 2/2 · question 2/4" in descs and "variant 1/2 · loading BF16" in descs
    assert all(0.0 <= v <= 1.0 for v, _ in progress.seen)


def test_refusals_are_plain(tab, data_root):
    with pytest.raises(gr.Error, match="listed data sets"):
        tab.run(families.DEV_FAMILY, ["BF16"], "/etc/passwd", 3)
    with pytest.raises(gr.Error, match="between 1 and"):
        tab.run(families.DEV_FAMILY, ["BF16"], "shapes-test", 0)
    (data_root / "ScienceQA" / "pid_splits.json").unlink()
    with pytest.raises(gr.Error, match="could not be read: .*pid_splits.json") as err:
        tab.run(families.DEV_FAMILY, ["BF16"], str((data_root / "ScienceQA").resolve()), 3)
    assert str(data_root) not in str(err.value)


SWEEP = {"questions": 300, "bf16": 0.9, "rows": [
    {"method": m, "bits": b, "n_seeds": n, "mean": a, "std": s, "min": a - s, "max": a + s, "accuracies": [a]}
    for m, b, n, a, s in [("ptq-rtn", 8, 1, 0.9, 0.0), ("ptq-rtn", 4, 1, 0.8, 0.0), ("qat-ce", 4, 3, 0.85, 0.02),
                          ("qat-grace", 4, 3, 0.87, 0.01)]]}


def test_the_zoo_bits_sweep_is_read_from_zoo_json(tmp_path, fixtures_dir):
    from demo.eval_tab import sweep_figure, sweep_rows
    from grace.zoo_sweep import read_sweep, sweep_table

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "zoo.json").write_text(__import__("json").dumps({"stages": {}, "sweep": SWEEP}))
    rows = sweep_table(zoo / "zoo.json")
    assert [(r["method"], r["bits"]) for r in rows][:2] == [("ptq-rtn", 8), ("ptq-rtn", 4)]
    figure = sweep_figure(rows, read_sweep(zoo)["bf16"])
    assert [t.name for t in figure.data] == ["round-to-nearest PTQ", "CE-only QAT", "GRACE QAT"]
    assert list(figure.data[0].x) == [4, 8] and list(figure.data[2].y) == [0.87]
    table = sweep_rows(rows)
    assert table[0][:3] == ["round-to-nearest PTQ", 8, 1] and ["GRACE QAT", 4, 3, 0.87, 0.01, "0.860-0.880"] in table
    assert sweep_table(tmp_path / "nowhere.json") == []
    s = settings.Settings(zoo_dir=zoo, fixtures_dir=fixtures_dir, hub="off", allow_local=[])
    tab = EvalTab(s, families.build_registry(s), ModelCache(2**30, device="cpu"))
    with gr.Blocks() as page:
        tab.build()
    assert any(getattr(block, "elem_id", None) == "eval-sweep-chart" for block in page.blocks.values())
