"""The built-in shapes task's held-out splits, and conversation JSON files (LLaVA / ShareGPT4V records
`{"image", "conversations", "type"?}`, images relative to the JSON): open questions scored by exact match
after lower-casing and stripping punctuation, per question type."""

from __future__ import annotations

import json
from pathlib import Path

from .item import BenchmarkError, EvalItem

SPLITS = {"shapes-test": "test", "shapes-val": "validation", "shapes-v2-test": "test", "shapes-v2-val": "validation"}
DEFAULT_QUESTIONS = 500


def read_shapes(name: str, limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    from ..data import shapes, shapes_v2

    make_sample = shapes_v2.make_sample if name.startswith("shapes-v2") else shapes.make_sample
    samples = (make_sample(SPLITS[name], seed, i) for i in range(limit or DEFAULT_QUESTIONS))
    return [EvalItem(s.question, s.answer, s.type, s.image, id=i, bench="shapes") for i, s in enumerate(samples)]


def read_conversations(path: Path, limit: int | None = None) -> list[EvalItem]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BenchmarkError(f"{path.name} is not readable JSON: {err}") from None
    if not isinstance(records, list):
        raise BenchmarkError(f"{path.name} is not a list of conversation records")
    items = []
    for position, record in enumerate(records[:limit]):
        turns = record.get("conversations") or [] if isinstance(record, dict) else []
        human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
        gpt = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
        if not isinstance(human, str) or not isinstance(gpt, str):
            raise BenchmarkError(f"{path.name}: record {position} lacks a human question or a gpt answer")
        image = path.parent / record["image"] if record.get("image") else None
        items.append(EvalItem(human.replace("<image>", "").strip(), gpt, str(record.get("type", "all")), image,
                              id=record.get("id", position), bench="conversation"))
    return items
