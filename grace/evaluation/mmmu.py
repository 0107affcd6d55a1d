"""MMMU as the Hugging Face parquet files, one folder per subject: DIR/<Subject>/validation-*.parquet.

Columns: id, question (with "<image N>" references), options (a string like "['a', 'b']"), answer,
question_type ("multiple-choice" | "open"), subfield, image_1 ... image_7. The pictures a question refers to
go to the model in order of first reference (image_1 when it refers to none). Multiple choice: the first
valid letter; open: the authors' number / normalised-text match. Breakdowns per subject and question type.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .item import LETTERS, BenchmarkError, EvalItem, has_image, text
from .tables import read_parquet

_TAG = re.compile(r"<image\s+(\d+)\s*>", re.IGNORECASE)


def parse_options(cell) -> list[str]:
    if isinstance(cell, (list, tuple)):
        return [str(o) for o in cell]
    if isinstance(cell, str) and cell.strip() not in ("", "[]"):
        try:
            parsed = ast.literal_eval(cell.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return []
        if isinstance(parsed, (list, tuple)):
            return [str(o) for o in parsed]
    return []


def referenced_images(row: dict) -> list:
    order, seen = [], set()
    for match in _TAG.finditer(text(row.get("question"))):
        number = int(match.group(1))
        cell = row.get(f"image_{number}")
        if number not in seen and has_image(cell):
            order.append(cell)
        seen.add(number)
    if not order and has_image(row.get("image_1")):
        order.append(row["image_1"])
    return order


def subject_files(path: Path, split: str) -> list[tuple[str, Path]]:
    if not path.is_dir():
        raise BenchmarkError(f"{path} is not a folder: give the MMMU folder holding one folder per subject")
    files = sorted((p for p in path.glob(f"*/{split}-*.parquet") if p.is_file()), key=str)
    if not files:
        raise BenchmarkError(f"no {split}-*.parquet files in the subject folders of {path} "
                             f"(expected {path}/<Subject>/{split}-00000-of-00001.parquet)")
    return [(p.parent.name, p) for p in files]


def read(path: Path, limit: int | None = None, split: str = "validation") -> list[EvalItem]:
    items = []
    for subject, file in subject_files(path, split):
        for row in read_parquet([file]):
            if limit is not None and len(items) >= limit:
                return items
            question_type = text(row.get("question_type") or "multiple-choice").lower()
            kind = "choice" if question_type.startswith("multi") else "open"
            options = parse_options(row.get("options")) if kind == "choice" else []
            gold = text(row.get("answer")).strip()
            items.append(EvalItem(text(row.get("question")), gold.upper() if kind == "choice" else gold, subject,
                                  referenced_images(row) or None,
                                  [(LETTERS[i], o) for i, o in enumerate(options[:len(LETTERS)])] or None,
                                  id=text(row.get("id")), bench="mmmu", kind=kind,
                                  groups={"subject": subject, "question_type": question_type},
                                  error="multiple-choice question without options" if kind == "choice" and not options
                                  else None))
    return items
