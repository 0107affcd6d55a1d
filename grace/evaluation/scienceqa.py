"""ScienceQA as published (lupantech/ScienceQA): problems.json + pid_splits.json + image folders.

    DIR/problems.json      {pid: {question, choices, answer (0-based), hint, image, subject, category, ...}}
    DIR/pid_splits.json    {"train": [...], "val": [...], "test": [4 241 pids], ...}
    DIR/images/test/<pid>/image.png   (or DIR/test/<pid>/image.png)

Only the split's pids, in pid_splits order. A question whose image file is absent is asked as text, as the
authors' script does; breakdowns per subject, modality (image / text) and category.
"""

from __future__ import annotations

import json
from pathlib import Path

from .item import LETTERS, BenchmarkError, EvalItem


def _json(path: Path, what: str):
    if not path.is_file():
        raise BenchmarkError(f"no {path.name} in {path.parent}: ScienceQA needs problems.json and pid_splits.json ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BenchmarkError(f"{path.name} is not readable JSON: {err}") from None


def read(path: Path, limit: int | None = None, split: str = "test") -> list[EvalItem]:
    folder = path.parent if path.is_file() else path
    problems = _json(path if path.is_file() else folder / "problems.json", "the questions")
    splits = _json(folder / "pid_splits.json", "which questions are in the test split")
    if not isinstance(problems, dict) or not isinstance(splits, dict) or split not in splits:
        raise BenchmarkError(f"pid_splits.json has no '{split}' split (it has: {', '.join(map(str, splits))})"
                             if isinstance(splits, dict) else "problems.json / pid_splits.json are not ScienceQA's")
    image_roots = [folder / "images" / split, folder / split]
    items, wanted_images, found_images = [], 0, 0
    for pid in splits[split][:limit]:
        pid = str(pid)
        if pid not in problems:
            raise BenchmarkError(f"pid_splits.json lists question {pid}, which problems.json lacks")
        p = problems[pid]
        image = None
        if p.get("image"):
            wanted_images += 1
            image = next((root / pid / p["image"] for root in image_roots if (root / pid / p["image"]).is_file()), None)
            found_images += image is not None
        choices = [str(c) for c in p.get("choices") or []]
        answer = p.get("answer")
        gold = LETTERS[answer] if isinstance(answer, int) and 0 <= answer < len(choices) else ""
        category = p.get("category") or "_unknown"
        items.append(EvalItem(str(p.get("question", "")), gold, category, image,
                              [(LETTERS[i], c) for i, c in enumerate(choices[:len(LETTERS)])], id=pid,
                              bench="scienceqa", kind="choice", hint=(p.get("hint") or "").strip() or None,
                              groups={"subject": p.get("subject") or "_unknown",
                                      "modality": "image" if image is not None else "text", "category": category},
                              error=None if choices else "question without choices"))
    if wanted_images and not found_images:
        raise BenchmarkError(f"none of the {wanted_images} ScienceQA images is in {image_roots[0]} or {image_roots[1]}: "
                             f"unzip the {split} images there (<pid>/image.png)")
    return items
