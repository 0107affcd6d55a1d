"""AI2D as the Hugging Face parquet shards (lmms-lab/ai2d): question, options (list), answer (0-based index
as a string), image. No id column: a question's id is its 0-based row position across the shards in sorted
file order. Four-way multiple choice, no breakdown.
"""

from __future__ import annotations

from pathlib import Path

from .item import LETTERS, EvalItem, text
from .tables import parquet_files, read_parquet


def gold_letter(answer, n_options: int) -> str:
    """The authors' reading of the gold: an index (int or digits) or a single letter; "" when out of range."""
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
        return LETTERS[index] if 0 <= index < n_options else ""
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:n_options]:
        return answer.strip().upper()
    return ""


def read(path: Path, limit: int | None = None) -> list[EvalItem]:
    rows = read_parquet(parquet_files(path))
    items = []
    for position, row in enumerate(rows[:limit]):
        question = row.get("question", row.get("Question"))
        options = [str(o) for o in (row.get("options", row.get("choices")) or [])][:len(LETTERS)]
        items.append(EvalItem(text(question), gold_letter(row.get("answer"), len(options)), "", row.get("image"),
                              [(LETTERS[i], o) for i, o in enumerate(options)], id=position, bench="ai2d",
                              kind="choice", error=None if options and question is not None else "row without options"))
    return items
