"""Tiny benchmark files in each published layout, written the way the real ones are (pandas TSV with base64
pictures, pyarrow parquet with Hugging Face image structs, JSON plus image folders)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def png_bytes(color: str = "red", size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def hf_image(color: str = "red") -> dict:
    return {"bytes": png_bytes(color), "path": f"{color}.png"}


def write_tsv(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def write_mmbench(path: Path) -> Path:
    """Four questions: a hint, a missing hint, three options, and a row whose image refers to another row's."""
    b64 = base64.b64encode(png_bytes("red")).decode()
    rows = [dict(index=10, question="What color is the square?", hint="The square is plain.", A="red", B="blue",
                 C="green", D="yellow", answer="A", category="color_attribute", **{"l2-category": "attribute"}, image=b64),
            dict(index=11, question="How many squares?", hint=None, A="one", B="two", C="three", D=None,
                 answer="A", category="counting", **{"l2-category": "attribute"}, image=b64),
            dict(index=12, question="Is it a photo?", hint="nan", A="yes", B="no", C=None, D=None, answer="B",
                 category="image_style", **{"l2-category": "coarse"}, image="10"),
            dict(index=13, question="Which shape?", hint=None, A="square", B="circle", C="line", D="dot", answer="A",
                 category="counting", **{"l2-category": "attribute"}, image=b64)]
    return write_tsv(path, rows)


def write_mmstar(path: Path, with_option_columns: bool = False) -> Path:
    b64 = base64.b64encode(png_bytes("blue")).decode()
    rows = []
    for i, (gold, category) in enumerate([("B", "coarse perception"), ("D", "math"), ("A", "math")]):
        row = dict(index=i, question=f"Question {i}?\nOptions: A: one, B: two, C: three, D: four", answer=gold,
                   category=category, l2_category=f"l2-{category}", bench="MMStar", image=b64)
        if with_option_columns:
            row.update(A="one", B="two", C="three", D="four")
        rows.append(row)
    return write_tsv(path, rows)


def write_scienceqa(folder: Path, image_root: str = "images") -> Path:
    """Five problems; pid_splits puts 3 and 1 in test (that order), 2 in val, 4 in train; 3 has a picture."""
    folder.mkdir(parents=True, exist_ok=True)
    def problem(q, choices, answer, image, subject, category, hint=""):
        return dict(question=q, choices=choices, answer=answer, hint=hint, image=image, subject=subject,
                    category=category, topic="t", grade="grade3", task="closed choice", lecture="", solution="")
    problems = {"1": problem("Which is a mammal?", ["shark", "whale", "trout"], 1, None, "natural science", "Classification",
                             hint="Whales breathe air."),
                "2": problem("Val question?", ["a", "b"], 0, None, "social science", "Geography"),
                "3": problem("Which color is shown?", ["red", "green"], 0, "image.png", "natural science", "Colors"),
                "4": problem("Train question?", ["a", "b"], 1, None, "language science", "Grammar"),
                "5": problem("Unlisted?", ["a", "b"], 1, None, "language science", "Grammar")}
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"train": ["4"], "val": ["2"], "test": ["3", "1"],
                                                         "minival": ["2"]}))
    picture = folder / image_root / "test" / "3" if image_root else folder / "test" / "3"
    picture.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "red").save(picture / "image.png")
    return folder


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_ai2d(folder: Path) -> Path:
    """Two shards (written out of order on purpose); answers as index strings, like lmms-lab/ai2d."""
    first = [dict(question=f"Diagram {i}?", options=["sun", "moon", "star", "rain"], answer=str(i % 4),
                  image=hf_image(COLORS[i])) for i in range(3)]
    second = [dict(question="Diagram 3?", options=["leaf", "root", "stem", "seed"], answer="2", image=hf_image("black"))]
    write_parquet(folder / "data" / "test-00001-of-00002.parquet", second)
    write_parquet(folder / "data" / "test-00000-of-00002.parquet", first)
    return folder


def hallusion_row(category, subcategory, set_id, figure_id, question_id, question, gold, image):
    return dict(category=category, subcategory=subcategory, visual_input="1" if image else "0", set_id=set_id,
                figure_id=figure_id, sample_note="note", question_id=question_id, question=question,
                gt_answer_details="details", gt_answer=gold, filename=None if image is None else "fig.png",
                image=image)


def write_hallusionbench(folder: Path) -> Path:
    """Four image questions on two figures (question_id repeats across figures) and two text-only ones."""
    image_rows = [hallusion_row("VD", "illusion", "0", "0", "0", "Is the left line longer?", "0", hf_image("red")),
                  hallusion_row("VD", "illusion", "0", "1", "0", "Is the left line longer?", "1", hf_image("blue")),
                  hallusion_row("VD", "illusion", "0", "0", "1", "Are the lines parallel?", "1", hf_image("red")),
                  hallusion_row("VS", "chart", "1", "0", "0", "Is the bar red?", "1", hf_image("green"))]
    text_rows = [hallusion_row("VS", "chart", "1", "0", "0", "Is the bar red?", "0", None),
                 hallusion_row("VD", "math", "2", "0", "0", "Is 2 larger than 3?", "0", None)]
    write_parquet(folder / "image-00000-of-00001.parquet", image_rows)
    write_parquet(folder / "non_image-00000-of-00001.parquet", text_rows)
    return folder


def mmmu_row(id_, question, options, answer, question_type, images: dict):
    row = dict(id=id_, question=question, options=options, explanation="", answer=answer, img_type="['Diagrams']",
               topic_difficulty="Easy", question_type=question_type, subfield="sub")
    for i in range(1, 8):
        row[f"image_{i}"] = images.get(i)
    return row


def write_mmmu(folder: Path) -> Path:
    """Two subjects; multiple choice with two pictures referred to out of order, and open questions."""
    write_parquet(folder / "Math" / "validation-00000-of-00001.parquet", [
        mmmu_row("validation_Math_1", "<image 2> and <image 1>: which is larger?", "['the first', 'the second', 'equal']",
                 "B", "multiple-choice", {1: hf_image("red"), 2: hf_image("blue")}),
        mmmu_row("validation_Math_2", "What is x in <image 1>?", "[]", "3.5", "open", {1: hf_image("green")})])
    write_parquet(folder / "Art" / "validation-00000-of-00001.parquet", [
        mmmu_row("validation_Art_1", "Who painted <image 1>?", "[]", "Monet", "open", {1: hf_image("yellow")}),
        mmmu_row("validation_Art_2", "Style of <image 1>?", "['cubism', 'impressionism']", "B", "multiple-choice",
                 {1: hf_image("white")})])
    write_parquet(folder / "Art" / "dev-00000-of-00001.parquet", [
        mmmu_row("dev_Art_1", "Dev question <image 1>?", "['a', 'b']", "A", "multiple-choice", {1: hf_image("black")})])
    return folder


def write_seed(folder: Path) -> Path:
    """Three image questions (one with a missing picture, one with a data_id lacking its extension) and a video one."""
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "SEED-Bench-image"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (20, 20), "red").save(images / "100.jpg")
    Image.new("RGB", (20, 20), "blue").save(images / "101.png")
    def q(qid, data_id, answer, type_id, data_type="image"):
        return dict(question_id=qid, question=f"Question {qid}?", choice_a="red", choice_b="blue", choice_c="green",
                    choice_d="gray", answer=answer, data_id=data_id, data_type=data_type, question_type_id=type_id)
    content = {"questions": [q("101", "100.jpg", "A", 1), q("v1-2", "0001.mp4", "B", 10, "video"),
                             q("102", "101", "B", 2), q("103", "999.jpg", "C", 1)],
               "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10}}
    (folder / "SEED-Bench.json").write_text(json.dumps(content))
    return folder


def write_data_root(root: Path) -> Path:
    """All seven benchmarks under one folder, each named as `--bench grace7 --data-root` finds it."""
    write_mmbench(root / "MMBench_DEV_EN.tsv")
    write_mmstar(root / "MMStar.tsv")
    write_scienceqa(root / "ScienceQA")
    write_ai2d(root / "AI2D")
    write_hallusionbench(root / "HallusionBench")
    write_mmmu(root / "MMMU")
    write_seed(root / "SEED-Bench")
    return root


def write_predictions(path: Path, answers: list[tuple[object, str]], **extra) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for question_id, answer in answers:
            f.write(json.dumps({"id": question_id, "answer": answer, **extra}) + "\n")
    return path
