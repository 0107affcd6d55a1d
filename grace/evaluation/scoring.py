"""Scoring replies: one record per question, a benchmark's summary with its breakdowns, and agreement between
model variants (where INT4 turns a right answer into a wrong one)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from . import hallusionbench
from .item import EvalItem
from .protocol import Protocol, extract, get_protocol, is_correct, normalize


def id_key(question_id) -> str:
    """A question id as the string predictions are matched by (HallusionBench's object: its six fields in order)."""
    if isinstance(question_id, dict):
        return json.dumps([str(question_id.get(k, "")) for k in hallusionbench.ID_FIELDS])
    if isinstance(question_id, float) and question_id.is_integer():
        question_id = int(question_id)
    return str(question_id)


@dataclass
class EvalResult:
    accuracy: float
    per_category: dict[str, float]
    n: int
    counts: dict[str, int] = field(default_factory=dict)            # questions per category
    breakdowns: dict[str, dict[str, dict]] = field(default_factory=dict)   # name -> value -> accuracy, correct, n
    metrics: dict[str, float] = field(default_factory=dict)          # parse failures, errors, qAcc / fAcc ...
    records: list[dict] = field(default_factory=list)
    bench: str = ""
    model: str | None = None

    @property
    def per_type(self) -> dict[str, float]:   # the shapes task calls its categories question types
        return self.per_category

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "per_category": self.per_category, "n": self.n}


def score_one(item: EvalItem, reply: str | None, protocol: str | Protocol = "grace", *, prompt: str | None = None,
              model: str | None = None, error: str | None = None) -> dict:
    """The record saved for one question: what was asked, the raw reply, what it was read as, and whether it is right."""
    reply = reply or ""
    error = error or item.error
    correct = error is None and is_correct(item, reply, protocol)
    record = {"bench": item.bench, "id": item.id, "answer": reply,
              "pred": "" if error else extract(item, reply, protocol), "gold": item.answer, "correct": bool(correct),
              "type": item.type, "error": error}
    if model is not None:
        record["model"] = model
    if prompt is not None:
        record["prompt"] = prompt
    return record


def _table(pairs) -> dict[str, dict]:
    right, seen = defaultdict(int), defaultdict(int)
    for key, ok in pairs:
        right[key] += ok
        seen[key] += 1
    return {k: {"accuracy": right[k] / seen[k], "correct": right[k], "n": seen[k]} for k in sorted(seen)}


def summarize(items: list[EvalItem], records: list[dict], *, bench: str = "", model: str | None = None) -> EvalResult:
    """A benchmark's result from the records of `items` (same order)."""
    correct = [bool(r["correct"]) for r in records]
    n = len(records)
    per_category = _table((item.type, ok) for item, ok in zip(items, correct) if item.type)
    breakdowns = {name: _table((item.groups[name], ok) for item, ok in zip(items, correct))
                  for name in dict.fromkeys(k for item in items for k in item.groups)}
    metrics = {"parse_fail": sum(1 for r in records if r["pred"] == "" and not r.get("error")),
               "errors": sum(1 for r in records if r.get("error"))}
    if bench == "hallusionbench" and items:
        metrics.update(hallusionbench.group_metrics(items, correct))
    return EvalResult(sum(correct) / n if n else 0.0, {k: v["accuracy"] for k, v in per_category.items()}, n,
                      {k: v["n"] for k, v in per_category.items()}, breakdowns, metrics, records, bench, model)


def score_replies(items: list[EvalItem], replies: dict[str, str], protocol: str | Protocol = "grace", *,
                  bench: str = "", model: str | None = None) -> tuple[EvalResult, int]:
    """Score saved replies keyed by id_key; questions without a reply are left out. Returns (result, missing)."""
    protocol = get_protocol(protocol)
    kept = [item for item in items if id_key(item.id) in replies]
    records = [score_one(item, replies[id_key(item.id)], protocol, model=model) for item in kept]
    return summarize(kept, records, bench=bench, model=model), len(items) - len(kept)


def _reading(record: dict) -> str:
    return normalize(record["pred"]) if record.get("error") is None else "\0error"


def compare(results: dict[str, EvalResult]) -> dict:
    """Per-question agreement of each variant with the first (the reference, e.g. BF16), and the questions the
    variant turns from right to wrong (and back). Only questions every variant answered count."""
    labels = list(results)
    if len(labels) < 2:
        return {}
    by_id = {label: {id_key(r["id"]): r for r in results[label].records} for label in labels}
    shared = [k for k in by_id[labels[0]] if all(k in by_id[label] for label in labels[1:])]
    reference = by_id[labels[0]]
    pairs = {}
    for label in labels[1:]:
        other = by_id[label]
        same = sum(_reading(reference[k]) == _reading(other[k]) for k in shared)
        pairs[label] = {"agreement": same / len(shared) if shared else 0.0, "shared": len(shared),
                        "right_to_wrong": [reference[k]["id"] for k in shared
                                           if reference[k]["correct"] and not other[k]["correct"]],
                        "wrong_to_right": [reference[k]["id"] for k in shared
                                           if not reference[k]["correct"] and other[k]["correct"]]}
    all_same = sum(len({_reading(by_id[label][k]) for label in labels}) == 1 for k in shared)
    return {"reference": labels[0], "questions": len(shared),
            "all_agree": all_same / len(shared) if shared else 0.0, "pairs": pairs}
