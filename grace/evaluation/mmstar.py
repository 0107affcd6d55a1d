"""MMStar as VLMEvalKit ships it (MMStar.tsv, 1 500 four-way questions).

Columns: index, question, answer, category, l2_category, image (base64), and A-D when the options are broken out;
otherwise the options live in the question text. The reply's LAST valid letter counts (the authors' MMStar rule).
"""

from __future__ import annotations

from pathlib import Path

from .item import EvalItem, cell, text
from .tables import find_file, read_tsv


def read(path: Path, limit: int | None = None) -> list[EvalItem]:
    rows = read_tsv(find_file(path, "*.tsv", "MMStar TSV"))
    items = []
    for row in rows[:limit]:
        options = [(letter, cell(row[letter]).strip()) for letter in "ABCD"
                   if cell(row.get(letter)).strip() and cell(row[letter]).strip().lower() != "nan"]
        category = text(row.get("category")) or "_unknown"
        items.append(EvalItem(cell(row["question"]), cell(row["answer"]).strip().upper(), category, row["image"],
                              options or None, id=row["index"], bench="mmstar", kind="choice", pick="last",
                              groups={"category": category, "l2_category": text(row.get("l2_category")) or "_unknown"}))
    return items
