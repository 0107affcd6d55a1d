"""SEED-Bench (image part) as published: SEED-Bench.json + the unzipped image folder.

    DIR/SEED-Bench.json     {"questions": [{question_id, question, choice_a..choice_d, answer, data_id,
                              data_type, question_type_id}, ...], "question_type": {name: id}}
    DIR/SEED-Bench-image/<data_id>   (or DIR/images/, or next to the JSON)

Only `data_type == "image"` questions; a question whose picture is missing is scored wrong, as the authors'
script does. Per question type (the nine dimensions).
"""

from __future__ import annotations

import json
from pathlib import Path

from .item import BenchmarkError, EvalItem, text
from .tables import find_file

IMAGE_FOLDERS = ("SEED-Bench-image", "images", "image")


def image_path(folder: Path, data_id: str) -> Path | None:
    candidates = [data_id] + ([f"{data_id}.jpg", f"{data_id}.png", f"{data_id}.jpeg"] if "." not in Path(data_id).name else [])
    return next((folder / c for c in candidates if (folder / c).is_file()), None)


def read(path: Path, limit: int | None = None) -> list[EvalItem]:
    json_file = find_file(path, "SEED*.json", "SEED-Bench JSON") if path.is_dir() else path
    if not json_file.is_file():
        raise BenchmarkError(f"{json_file} does not exist: give the SEED-Bench folder or SEED-Bench.json")
    try:
        content = json.loads(json_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BenchmarkError(f"{json_file.name} is not readable JSON: {err}") from None
    questions = content.get("questions", []) if isinstance(content, dict) else content
    type_names = {int(v): k for k, v in (content.get("question_type") or {}).items()} if isinstance(content, dict) else {}
    if not isinstance(questions, list):
        raise BenchmarkError(f"{json_file.name} has no list of questions")
    base = json_file.parent
    folder = next((base / name for name in IMAGE_FOLDERS if (base / name).is_dir()), base)
    items = []
    for q in questions:
        if not isinstance(q, dict) or str(q.get("data_type", "")).lower() != "image":
            continue
        if limit is not None and len(items) >= limit:
            break
        options = [(letter, str(q.get(f"choice_{letter.lower()}"))) for letter in "ABCD"
                   if q.get(f"choice_{letter.lower()}") is not None and str(q.get(f"choice_{letter.lower()}")).strip()]
        picture = image_path(folder, str(q["data_id"])) if q.get("data_id") else None
        try:
            type_id = int(q.get("question_type_id"))
        except (TypeError, ValueError):
            type_id = None
        qtype = type_names.get(type_id) or f"type_{type_id}"
        items.append(EvalItem(text(q.get("question")), text(q.get("answer")).strip().upper(), qtype, picture, options,
                              id=text(q.get("question_id")), bench="seed", kind="choice", groups={"question_type": qtype},
                              error=None if picture is not None else f"image not found: {q.get('data_id')}"))
    if items and all(item.image is None for item in items):
        raise BenchmarkError(f"none of the SEED-Bench images is in {folder}: unzip SEED-Bench-image.zip next to the JSON")
    return items
