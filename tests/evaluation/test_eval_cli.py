"""`python -m grace eval`: re-scoring, prompt dumps, several models, the release row, and plain errors."""

import json
import subprocess
import sys

import pytest

from grace.cli import main

import bench_files as bf


def run(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_rescoring_prints_the_summary_last(tmp_path, capsys):
    data = bf.write_hallusionbench(tmp_path / "HallusionBench")
    ids = [{"category": "VD", "subcategory": "illusion", "visual_input": "1", "set_id": "0", "figure_id": f,
            "question_id": q} for f, q in (("0", "0"), ("1", "0"), ("0", "1"))]
    preds = bf.write_predictions(tmp_path / "p.jsonl", [(ids[0], "No"), (ids[1], "No"), (ids[2], "Yes, it is")])
    code, out, err = run(capsys, "--bench", "hallusionbench", "--data", data, "--predictions", preds, "--json")
    assert code == 0 and last_json(out) == {"accuracy": pytest.approx(2 / 3), "per_category": {"VD": pytest.approx(2 / 3)},
                                            "n": 3}
    code, out, _ = run(capsys, "--bench", "hallusionbench", "--data", data, "--predictions", preds)
    assert code == 0 and "qAcc" in out and "3 questions have no saved answer" in out


def test_dump_prompts_without_a_model(tmp_path, capsys):
    data = bf.write_mmbench(tmp_path / "MMBench_DEV_EN.tsv")
    code, _, err = run(capsys, "--data", data, "--dump-prompts", tmp_path / "p.jsonl", "--protocol", "llava")
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert code == 0 and "wrote 4 MMBench prompts" in err
    assert lines[0]["prompt"].endswith("D. yellow\nAnswer with the option's letter from the given choices directly.")


def test_grace7_release_row_from_saved_answers(tmp_path, capsys):
    bf.write_data_root(tmp_path)
    preds = tmp_path / "all.jsonl"
    answers = {"mmbench": [(10, "A"), (11, "B")], "mmstar": [(0, "B"), (1, "B")], "scienceqa": [("3", "A"), ("1", "B")],
               "ai2d": [(0, "A"), (1, "A")], "mmmu": [("validation_Art_1", "Monet")], "seed": [("101", "A"), ("102", "A")],
               "hallusionbench": [({"category": "VD", "subcategory": "math", "visual_input": "0", "set_id": "2",
                                    "figure_id": "0", "question_id": "0"}, "No")]}
    with preds.open("w") as f:
        for bench, pairs in answers.items():
            f.writelines(json.dumps({"bench": bench, "id": i, "answer": a, "model": "w4"}) + "\n" for i, a in pairs)
    code, out, err = run(capsys, "--bench", "grace7", "--data-root", tmp_path, "--predictions", preds, "--json")
    assert code == 0, err
    row = last_json(out)["release_row"]["w4"]
    assert row == {"hallusionbench": 100.0, "mmbench": 50.0, "scienceqa": 100.0, "ai2d": 50.0, "mmmu": 100.0,
                   "seed": 50.0, "mmstar": 50.0, "average": pytest.approx(500 / 7, abs=0.01)}
    code, out, _ = run(capsys, "--bench", "grace7", "--data-root", tmp_path, "--predictions", preds)
    assert "release row" in out and "MMStar" in out


def test_several_models_report_agreement(tmp_path, capsys, fixtures_dir):
    data = bf.write_mmbench(tmp_path / "MMBench.tsv")
    out_file = tmp_path / "run.jsonl"
    code, out, err = run(capsys, "--model", fixtures_dir / "qwen3vl-tiny-bf16", "--model",
                         fixtures_dir / "qwen3vl-tiny-grace-w4g128-awq", "--data", data, "--limit", 2,
                         "--out", out_file, "--json")
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [line.get("n") for line in lines[:2]] == [2, 2]
    pair = lines[-1]["comparison"]["pairs"][str(fixtures_dir / "qwen3vl-tiny-grace-w4g128-awq")]
    assert 0.0 <= pair["agreement"] <= 1.0 and pair["shared"] == 2
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(records) == 4 and len({r["model"] for r in records}) == 2
    # the saved run re-scores to the same numbers, per model
    code, out2, _ = run(capsys, "--data", data, "--predictions", out_file, "--limit", 2, "--json")
    assert [json.loads(x)["accuracy"] for x in out2.strip().splitlines()[:2]] == [line["accuracy"] for line in lines[:2]]


@pytest.mark.parametrize("argv,message", [
    (["--model", "m", "--data", "/no/such/file.tsv"], "does not exist"),
    (["--model", "m", "--limit", "0"], "at least 1"),
    (["--model", "m", "--limit", "x"], "whole number"),
    (["--bench", "mmbench", "--model", "m"], "needs --data"),
    (["--bench", "grace7", "--model", "m"], "--data-root"),
    (["--data", "shapes-test"], "give --model"),
    (["--bench", "ai2d", "--data", "{tmp}", "--predictions", "{tmp}/none.jsonl"], "no parquet files"),
    (["--bench", "mmbench", "--data", "{tmp}/m.tsv", "--predictions", "{tmp}/none.jsonl"], "no predictions file"),
    (["--bench", "mmbench", "--data", "{tmp}/m.tsv", "--predictions", "{tmp}/bad.jsonl"], "line 1 is not JSON"),
    (["--bench", "mmbench", "--data", "{tmp}/m.tsv", "--predictions", "{tmp}/other.jsonl"], "no id"),
    (["--model", "m", "--resume"], "--out"),
])
def test_bad_input_gets_a_plain_message(tmp_path, capsys, argv, message):
    bf.write_mmbench(tmp_path / "m.tsv")
    (tmp_path / "bad.jsonl").write_text("{nope\n{}\n")
    bf.write_predictions(tmp_path / "other.jsonl", [(999, "A")])
    try:
        code = main(["eval", *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    except SystemExit as stop:   # argparse's own refusals
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_no_traceback_from_a_real_process(tmp_path):
    (tmp_path / "MMMU").mkdir()
    done = subprocess.run([sys.executable, "-m", "grace", "eval", "--model", "m", "--data", str(tmp_path / "MMMU"),
                           "--bench", "mmmu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no validation-*.parquet files" in done.stderr
    assert "Traceback" not in done.stderr


def test_existing_out_file_needs_resume(tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text("")
    with pytest.raises(SystemExit):
        main(["eval", "--model", "m", "--out", str(tmp_path / "r.jsonl")])
    assert "--resume" in capsys.readouterr().err


def test_shapes_json_line_with_a_real_model(fixtures_dir):
    done = subprocess.run([sys.executable, "-m", "grace", "eval", "--model", str(fixtures_dir / "qwen3vl-tiny-bf16"),
                           "--data", "shapes-test", "--limit", "3", "--max-new-tokens", "4", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = last_json(done.stdout)
    assert summary["n"] == 3 and 0.0 <= summary["accuracy"] <= 1.0
    assert set(summary["per_category"]) <= {"color", "count", "exist", "left", "describe"}
