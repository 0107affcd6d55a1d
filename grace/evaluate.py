"""`grace.evaluate` / `python -m grace eval`: accuracy of a model, greedy decoding, the paper's way.

Data sets:
- `shapes-test` (and `shapes-val`): the fixed shapes task's held-out split, generated on the fly;
- a conversation JSON (LLaVA / ShareGPT4V: `{"image", "conversations", "type"?}`; images relative
  to the JSON's folder): open questions, exact match after lower-casing and stripping punctuation,
  per-type accuracy from the optional `type` field;
- an MMBench TSV (index, question, hint, A-D, answer, base64 image[, category]) and a ScienceQA
  problems JSON (`{id: {question, choices, answer, hint, image, subject}}`): multiple choice with the
  LLaVA suffix, the predicted letter compared with the answer, per-category accuracy.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import re
import string
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGH"


@dataclass
class EvalItem:
    question: str
    answer: str
    type: str = "all"
    image: Image.Image | Path | None = None
    choices: list[str] | None = None       # multiple choice: option texts, letters A.. in order

    def load_image(self) -> Image.Image | None:
        if self.image is None or isinstance(self.image, Image.Image):
            return self.image
        try:
            with Image.open(self.image) as img:
                return img.convert("RGB")
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {self.image}: {err}") from None


@dataclass
class EvalResult:
    accuracy: float
    per_type: dict[str, float]
    n: int
    counts: dict[str, int] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "per_type": self.per_type, "n": self.n}


# -- scoring --------------------------------------------------------------------------------------

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT).split())


def predicted_letter(text: str, n_choices: int) -> str | None:
    """The option letter a model answered: "B", "(B)", "B. text", "The answer is B."."""
    valid = LETTERS[:n_choices]
    text = text.strip()
    match = re.match(rf"^\(?([{valid}])(?:[\).:\s]|$)", text)
    if match:
        return match.group(1)
    match = re.search(rf"answer is \(?([{valid}])\b", text)
    return match.group(1) if match else None


def is_correct(item: EvalItem, prediction: str) -> bool:
    if item.choices is not None:
        return predicted_letter(prediction, len(item.choices)) == item.answer.strip().upper()
    return normalize(prediction) == normalize(item.answer)


# -- readers ----------------------------------------------------------------------------------------

def read_conversations(path: Path) -> list[EvalItem]:
    records = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for record in records:
        turns = record.get("conversations") or []
        human = next((t["value"] for t in turns if t.get("from") == "human"), None)
        gpt = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        if human is None or gpt is None:
            raise ValueError(f"{path}: item {record.get('id', '?')} lacks a human question or a gpt answer")
        image = path.parent / record["image"] if record.get("image") else None
        question = human.replace("<image>", "").strip()
        items.append(EvalItem(question, gpt, record.get("type", "all"), image))
    return items


def mc_prompt(question: str, options: list[str], hint: str | None) -> str:
    lines = ([hint.strip()] if hint else []) + [question.strip()]
    lines += [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join(lines + [MC_SUFFIX])


def read_mmbench(path: Path) -> list[EvalItem]:
    items = []
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            options = [row[c] for c in "ABCD" if row.get(c) not in (None, "", "nan")]
            hint = row.get("hint")
            hint = None if hint in (None, "", "nan") else hint
            image = Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
            items.append(EvalItem(mc_prompt(row["question"], options, hint), row["answer"].strip(),
                                  row.get("category") or "all", image, options))
    return items


def read_scienceqa(path: Path) -> list[EvalItem]:
    problems = json.loads(path.read_text(encoding="utf-8"))
    items = []
    for pid, p in problems.items():
        image = None
        if p.get("image"):
            candidates = [path.parent / p["image"], path.parent / p.get("split", "test") / pid / p["image"]]
            image = next((c for c in candidates if c.is_file()), candidates[0])
        options = list(p["choices"])
        items.append(EvalItem(mc_prompt(p["question"], options, p.get("hint") or None), LETTERS[int(p["answer"])],
                              p.get("subject") or p.get("category") or "all", image, options))
    return items


def read_dataset(data: str, limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    if data in ("shapes-test", "shapes-val"):
        from .data.shapes import make_sample

        split = "test" if data == "shapes-test" else "validation"
        samples = (make_sample(split, seed, i) for i in range(limit or 500))
        return [EvalItem(s.question, s.answer, s.type, s.image) for s in samples]
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"no data set '{data}': give shapes-test, or a .json / .tsv file")
    if path.suffix == ".tsv":
        items = read_mmbench(path)
    else:
        content = json.loads(path.read_text(encoding="utf-8"))
        items = read_scienceqa(path) if isinstance(content, dict) else read_conversations(path)
    return items[:limit] if limit else items


# -- running ----------------------------------------------------------------------------------------

def evaluate(model, data: str | Iterable[EvalItem], *, limit: int | None = None, max_new_tokens: int = 24,
             progress: bool | Callable[[int, int], None] = True, device=None) -> EvalResult:
    """Greedy-decode every item and score it. `model`: a LoadedModel or anything grace.load takes.
    `progress`: True for a tqdm bar on stderr, or a callback (done, total)."""
    from .chat import GenerationSettings, answer
    from .load import LoadedModel, load

    loaded = model if isinstance(model, LoadedModel) else load(model, device=device)
    items = read_dataset(data, limit) if isinstance(data, str) else list(data)[:limit]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False)
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"eval {Path(str(loaded.source)).name}", file=sys.stderr)
    correct, seen, records = defaultdict(int), defaultdict(int), []
    for index, item in enumerate(items):
        prediction = answer(loaded, item.load_image(), item.question, settings).text
        ok = is_correct(item, prediction)
        correct[item.type] += ok
        seen[item.type] += 1
        records.append({"question": item.question, "answer": item.answer, "prediction": prediction,
                        "type": item.type, "correct": ok})
        if bar is not None:
            bar.update(1)
        elif callable(progress):
            progress(index + 1, len(items))
    if bar is not None:
        bar.close()
    n = sum(seen.values())
    per_type = {t: correct[t] / seen[t] for t in sorted(seen)}
    return EvalResult(sum(correct.values()) / n if n else 0.0, per_type, n, dict(seen), records)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m grace eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub repo id")
    parser.add_argument("--data", default="shapes-test", help="shapes-test | conversation .json | MMBench .tsv | ScienceQA .json")
    parser.add_argument("--limit", type=int, default=None, help="first N items (shapes: N questions, default 500)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print only the final JSON line")
    parser.add_argument("--predictions", help="write every item's prediction to this JSONL file")
    args = parser.parse_args(argv)
    result = evaluate(args.model, args.data, limit=args.limit, max_new_tokens=args.max_new_tokens,
                      device=args.device)
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in result.records)
    if not args.json:
        print(f"accuracy {result.accuracy:.3f} on {result.n} questions", file=sys.stderr)
        for name, acc in result.per_type.items():
            print(f"  {name:12s} {acc:.3f}  (n={result.counts[name]})", file=sys.stderr)
    print(json.dumps(result.summary()))
    return 0
