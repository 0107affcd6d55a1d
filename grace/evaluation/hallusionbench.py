"""HallusionBench as the Hugging Face parquet shards (lmms-lab/HallusionBench): image-*.parquet (951 questions
on a figure) and non_image-*.parquet (178 text-only), read in sorted file order.

Columns: category, subcategory, visual_input, set_id, figure_id, question_id, question, gt_answer ("1" yes /
"0" no), image (HF image struct, empty for text-only rows). `question_id` repeats, so a question's id is the
object {category, subcategory, visual_input, set_id, figure_id, question_id} with string values.
Accuracy is aAcc (per question); qAcc (every question of a (category, subcategory, set_id, question_id) group
right) and fAcc (every question on one figure right) are reported beside it.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .item import EvalItem, has_image, text
from .tables import parquet_files, read_parquet

ID_FIELDS = ("category", "subcategory", "visual_input", "set_id", "figure_id", "question_id")


def read(path: Path, limit: int | None = None) -> list[EvalItem]:
    rows = read_parquet(parquet_files(path))
    items = []
    for row in rows[:limit]:
        picture = row.get("image") if has_image(row.get("image")) else None
        category, subcategory = text(row.get("category")) or "_unknown", text(row.get("subcategory")) or "_unknown"
        items.append(EvalItem(text(row.get("question")), text(row.get("gt_answer")).strip(), category, picture,
                              id={k: text(row.get(k)) for k in ID_FIELDS}, bench="hallusionbench", kind="yesno",
                              groups={"category": category, "subcategory": f"{category}/{subcategory}",
                                      "modality": "image" if picture is not None else "text"}))
    return items


def group_metrics(items: list[EvalItem], correct: list[bool]) -> dict[str, float]:
    """qAcc and fAcc: the share of question groups / figures where every question was answered right."""
    questions, figures = defaultdict(list), defaultdict(list)
    for item, ok in zip(items, correct):
        key = item.id
        questions[(key["category"], key["subcategory"], key["set_id"], key["question_id"])].append(ok)
        if item.image is not None:
            figures[(key["category"], key["subcategory"], key["set_id"], key["figure_id"])].append(ok)
    metrics = {"aAcc": sum(correct) / len(correct) if correct else 0.0}
    for name, groups in (("qAcc", questions), ("fAcc", figures)):
        metrics[name] = sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0
        metrics[f"{name}_groups"] = len(groups)
    return metrics
