"""The evaluator's readers and scoring, on tiny files in each benchmark's layout."""

import base64
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from grace.evaluate import (EvalItem, evaluate, is_correct, mc_prompt, normalize, predicted_letter, read_dataset)


def png_b64(color="red"):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_normalize_and_exact_match():
    assert normalize("  A Red circle, and a BLUE square. ") == "a red circle and a blue square"
    assert is_correct(EvalItem("q", "yes"), "Yes.")
    assert not is_correct(EvalItem("q", "yes"), "yes no")


@pytest.mark.parametrize("text,letter", [("B", "B"), ("(C) because", "C"), ("A. cat", "A"), ("The answer is D.", "D"),
                                         ("b", None), ("E", None), ("Banana", None)])
def test_predicted_letter(text, letter):
    assert predicted_letter(text, 4) == letter


def test_mmbench_tsv(tmp_path):
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
            ["0", "What color?", "nan", "red", "blue", "green", "yellow", "A", "color", png_b64("red")],
            ["1", "Which shape?", "Look closely", "circle", "square", "", "", "B", "shape", png_b64("blue")]]
    path = tmp_path / "mmbench.tsv"
    path.write_text("\n".join("\t".join(r) for r in rows))
    items = read_dataset(str(path))
    assert [i.answer for i in items] == ["A", "B"] and [i.type for i in items] == ["color", "shape"]
    assert items[0].choices == ["red", "blue", "green", "yellow"] and items[1].choices == ["circle", "square"]
    assert items[1].question.startswith("Look closely\nWhich shape?\nA. circle\nB. square\n")
    assert items[0].question.endswith("Answer with the option's letter from the given choices directly.")
    assert items[0].load_image().size == (32, 32)


def test_scienceqa_json(tmp_path):
    (tmp_path / "test" / "7").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "test" / "7" / "image.png")
    problems = {"7": {"question": "Which is a mammal?", "choices": ["shark", "whale", "trout"], "answer": 1,
                      "hint": "", "image": "image.png", "subject": "natural science", "split": "test"},
                "8": {"question": "2+2?", "choices": ["3", "4"], "answer": 1, "hint": "math", "image": None,
                      "subject": "language science", "split": "test"}}
    path = tmp_path / "problems.json"
    path.write_text(json.dumps(problems))
    items = read_dataset(str(path))
    assert [i.answer for i in items] == ["B", "B"] and items[0].type == "natural science"
    assert items[0].load_image().size == (16, 16) and items[1].image is None
    assert items[1].question == mc_prompt("2+2?", ["3", "4"], "math")


def test_conversation_json_relative_images(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20), "green").save(tmp_path / "images" / "a.png")
    records = [{"id": "a", "image": "images/a.png", "type": "color",
                "conversations": [{"from": "human", "value": "<image>\nWhat color is the square?"},
                                  {"from": "gpt", "value": "green"}]}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    item = read_dataset(str(path))[0]
    assert item.question == "What color is the square?" and item.answer == "green" and item.type == "color"
    assert item.load_image().getpixel((3, 3)) == (0, 128, 0)


def test_missing_image_is_a_clear_error(tmp_path):
    item = EvalItem("q", "a", image=tmp_path / "nope.png")
    with pytest.raises(ValueError, match="nope.png"):
        item.load_image()


def test_shapes_test_split_is_deterministic():
    a = read_dataset("shapes-test", limit=5)
    b = read_dataset("shapes-test", limit=5)
    assert [(i.question, i.answer) for i in a] == [(i.question, i.answer) for i in b]
    assert a[0].image.tobytes() == b[0].image.tobytes()


def test_evaluate_scores_and_breaks_down(monkeypatch, fixtures_dir):
    import grace
    import grace.chat as chat

    loaded = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu")
    items = [EvalItem("q1", "red", "color"), EvalItem("q2", "two", "count"), EvalItem("q3", "blue", "color")]
    replies = {"q1": "Red.", "q2": "three", "q3": "blue"}

    def fake_answer(model, image, question, settings):
        return chat.Generation(text=replies[question])

    monkeypatch.setattr(chat, "answer", fake_answer)
    result = evaluate(loaded, items, progress=False)
    assert result.n == 3 and result.accuracy == pytest.approx(2 / 3)
    assert result.per_type == {"color": 1.0, "count": 0.0}


def test_cli_json_line(fixtures_dir):
    out = subprocess.run([sys.executable, "-m", "grace", "eval", "--model", str(fixtures_dir / "qwen3vl-tiny-bf16"),
                          "--data", "shapes-test", "--limit", "3", "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["n"] == 3 and 0.0 <= summary["accuracy"] <= 1.0 and set(summary["per_type"]) <= \
        {"color", "count", "exist", "left", "describe"}
