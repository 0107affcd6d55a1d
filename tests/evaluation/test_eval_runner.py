"""Running models over benchmark files: JSONL records, resume, re-scoring, prompt dumps, several variants."""

import json

import pytest

import grace
from grace.evaluation import EvalItem, dump_prompts, evaluate, rescore, runner

import bench_files as bf


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    return grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu")


class FakeModel:
    """Replies by question text; remembers what it was asked (prompt, number of pictures, token budget)."""

    def __init__(self, replies, fail_after=None):
        self.replies, self.asked, self.fail_after = replies, [], fail_after

    def __call__(self, loaded, images, prompt, max_new_tokens):
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise KeyboardInterrupt   # the run is killed
        self.asked.append((prompt, len(images), max_new_tokens))
        return next(reply for key, reply in self.replies.items() if key in prompt)


def test_evaluate_writes_every_prompt_and_reply(tmp_path, tiny, monkeypatch):
    fake = FakeModel({"Art_1": "", "painted": "Monet", "Style": "B", "larger": "(B)", "What is x": "3.5"})
    monkeypatch.setattr(runner, "generate", fake)
    out = tmp_path / "mmmu.jsonl"
    result = evaluate(tiny, bf.write_mmmu(tmp_path / "MMMU"), out=out, progress=False, label="bf16")
    assert result.accuracy == 1.0 and result.n == 4 and result.per_category == {"Art": 1.0, "Math": 1.0}
    assert [(n, tokens) for _, n, tokens in fake.asked] == [(1, 32), (1, 8), (2, 8), (1, 32)]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["validation_Art_1", "validation_Art_2", "validation_Math_1", "validation_Math_2"]
    assert records[2]["prompt"].startswith("Question: <image> and <image>") and records[2]["answer"] == "(B)"
    assert all(r["model"] == "bf16" and r["bench"] == "mmmu" and r["correct"] for r in records)


def test_resume_continues_where_the_run_stopped(tmp_path, tiny, monkeypatch):
    data = bf.write_mmbench(tmp_path / "MMBench.tsv")
    replies = {"color": "A", "How many": "B", "photo": "B", "Which shape": "A"}
    out = tmp_path / "run.jsonl"
    monkeypatch.setattr(runner, "generate", FakeModel(replies, fail_after=2))
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny, data, out=out, progress=False, label="m")
    assert len(out.read_text().splitlines()) == 2
    with out.open("a") as f:
        f.write('{"bench": "mmbench", "id": 12, "ans')          # a line torn by the kill
    second = FakeModel(replies)
    monkeypatch.setattr(runner, "generate", second)
    result = evaluate(tiny, data, out=out, resume=True, progress=False, label="m")
    assert len(second.asked) == 2 and "photo" in second.asked[0][0]   # only the two questions not yet answered
    assert result.n == 4 and result.accuracy == 0.75
    full = evaluate(tiny, data, progress=False, label="m")          # the same as one uninterrupted run
    assert full.summary() == result.summary()
    third = FakeModel(replies)
    monkeypatch.setattr(runner, "generate", third)
    evaluate(tiny, data, out=out, resume=True, progress=False, label="m", protocol="llava")
    assert len(third.asked) == 4                                    # other prompts: nothing to reuse


def test_failed_questions_are_recorded_and_scored_wrong(tmp_path, tiny, monkeypatch):
    def broken(loaded, images, prompt, max_new_tokens):
        raise RuntimeError("CUDA out of memory\nlong details")

    monkeypatch.setattr(runner, "generate", broken)
    result = evaluate(tiny, bf.write_seed(tmp_path / "seed"), progress=False)
    assert result.n == 3 and result.accuracy == 0.0 and result.metrics["errors"] == 3
    assert result.records[0]["error"] == "CUDA out of memory" and "999.jpg" in result.records[2]["error"]


def test_rescore_saved_answers_per_model(tmp_path):
    data = bf.write_ai2d(tmp_path / "ai2d")
    path = tmp_path / "preds.jsonl"
    with path.open("w") as f:
        for model, answers in {"bf16": "ABCC", "w4": "ABDD"}.items():
            for i, a in enumerate(answers):
                f.write(json.dumps({"id": str(i), "answer": a, "model": model, "bench": "ai2d"}) + "\n")
            f.write(json.dumps({"id": 0, "answer": "Z", "model": model, "bench": "mmbench"}) + "\n")  # other bench
    scored = rescore(data, path, bench="ai2d")
    assert scored["bf16"][0].accuracy == 1.0 and scored["w4"][0].accuracy == 0.5 and scored["w4"][1] == 0
    assert rescore(data, {0: "A", 1: "C"}, bench="ai2d")[None][0].summary() == \
        {"accuracy": 0.5, "per_category": {}, "n": 2}


def test_dump_prompts(tmp_path):
    data = bf.write_scienceqa(tmp_path / "sqa")
    count = dump_prompts(data, tmp_path / "prompts.jsonl", bench="scienceqa")
    lines = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert count == 2 and [line["id"] for line in lines] == ["3", "1"]
    assert lines[0] == {"bench": "scienceqa", "id": "3", "images": 1, "max_new_tokens": 8,
                        "prompt": "Question: Which color is shown?\nOptions:\n(A) red\n(B) green\n"
                                  "Answer with only the option letter."}


def test_library_entry_exposes_the_pieces():
    assert grace.evaluate is evaluate and grace.evaluate.rescore is rescore
    assert not hasattr(grace, "eval")
    assert grace.evaluate.read_benchmark("shapes", "shapes-test", 2)[1][0].bench == "shapes"


def test_real_model_one_and_several_pictures(tmp_path, tiny):
    """The tiny random model through the real generation path, one picture (MMBench) and two (MMMU)."""
    mmbench = evaluate(tiny, bf.write_mmbench(tmp_path / "MMBench.tsv"), limit=2, progress=False)
    mmmu = evaluate(tiny, bf.write_mmmu(tmp_path / "MMMU"), progress=False, max_new_tokens=3)
    assert mmbench.n == 2 and mmmu.n == 4
    assert not any(r["error"] for r in mmbench.records + mmmu.records), mmmu.records
    assert all(isinstance(r["answer"], str) for r in mmmu.records)


def test_shapes_items_and_old_style_items(tiny, monkeypatch):
    monkeypatch.setattr(runner, "generate", lambda loaded, images, prompt, n: {"q1": "Red.", "q2": "three"}.get(prompt, "blue"))
    items = [EvalItem("q1", "red", "color"), EvalItem("q2", "two", "count"), EvalItem("q3", "blue", "color")]
    result = evaluate(tiny, items, progress=False)
    assert result.n == 3 and result.accuracy == pytest.approx(2 / 3) and result.per_type == {"color": 1.0, "count": 0.0}
