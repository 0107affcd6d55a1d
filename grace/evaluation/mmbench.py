"""MMBench as VLMEvalKit ships it (e.g. MMBench_DEV_EN.tsv): one row per question, without CircularEval.

Columns: index, question, hint, A-D, answer, category, l2-category, image (base64). Options are the letter
columns that are not empty; per category and l2-category accuracy.
"""

from __future__ import annotations

from pathlib import Path

from .item import EvalItem, cell, missing, text
from .tables import find_file, read_tsv


def row_options(row: dict, letters: str = "ABCD") -> list[tuple[str, str]]:
    """(letter, text) for each letter column with a value, as pandas reads it (empty / NaN cells skipped)."""
    return [(letter, cell(row[letter])) for letter in letters if letter in row and not missing(row[letter])]


def read(path: Path, limit: int | None = None) -> list[EvalItem]:
    rows = read_tsv(find_file(path, "*.tsv", "MMBench TSV"))
    items = []
    for row in rows[:limit]:
        hint = cell(row.get("hint")).strip()
        category = text(row.get("category")) or "_unknown"
        items.append(EvalItem(cell(row["question"]), cell(row["answer"]).strip().upper(), category, row["image"],
                              row_options(row), id=row["index"], bench="mmbench",
                              hint=None if not hint or hint.lower() == "nan" else hint,
                              groups={"category": category, "l2-category": text(row.get("l2-category")) or "_unknown"}))
    return items
