"""Running a model over a benchmark: greedy answers, one JSONL record per question written as it is answered
(so `resume` continues where a run stopped), and re-scoring saved answers without a model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterable

from .benchmarks import TITLES, read_benchmark
from .item import BenchmarkError, EvalItem
from .protocol import Protocol, build_prompt, get_protocol
from .scoring import EvalResult, id_key, score_one, score_replies, summarize


def generate(loaded, images: list, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy reply to one prompt with its pictures (image entries first, then the text)."""
    from .. import chat
    from ..cpu_decode import cache_kwargs

    if len(images) <= 1:
        settings = chat.GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False)
        return chat.answer(loaded, images[0] if images else None, prompt, settings).text
    import torch

    processor = loaded.processor   # several pictures (MMMU): the chat helper takes one, so build the input here
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt").to(loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **cache_kwargs(loaded.model),
                                    pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class RecordLog:
    """The JSONL file every answered question goes to. With `resume`, the records already in it are kept and
    reused; without, an existing file is replaced."""

    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self.done: dict[tuple, dict] = {}
        if resume and self.path.is_file():
            for record in read_jsonl(self.path):
                if "id" in record and "answer" in record:
                    self.done[(record.get("bench"), record.get("model"), id_key(record["id"]))] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.is_file():
            drop_torn_line(self.path)
        self.file = self.path.open("a" if resume else "w", encoding="utf-8")

    def previous(self, bench: str, model: str | None, item: EvalItem) -> dict | None:
        return self.done.get((bench, model, id_key(item.id)))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def drop_torn_line(path: Path) -> None:
    """Cut a last line a killed run left half-written, so appended records start on a line of their own."""
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: Path) -> list[dict]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BenchmarkError(f"cannot read {path}: {err}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):   # a run killed mid-write leaves a torn last line: drop it
                break
            raise BenchmarkError(f"{path.name} line {number} is not JSON") from None
        if not isinstance(record, dict):
            raise BenchmarkError(f"{path.name} line {number} is not a JSON object")
        records.append(record)
    return records


def load_items(data, bench: str | None = None, limit: int | None = None, split: str | None = None) -> tuple[str, list[EvalItem]]:
    if isinstance(data, (str, Path)):
        return read_benchmark(bench, data, limit, split)
    items = list(data)[:limit]
    return (items[0].bench if items else bench or ""), items


def evaluate(model, data: str | Path | Iterable[EvalItem], *, bench: str | None = None, protocol: str | Protocol = "grace",
             limit: int | None = None, max_new_tokens: int | None = None, split: str | None = None,
             progress: bool | Callable[[int, int], None] = True, device=None, out: str | Path | RecordLog | None = None,
             resume: bool = False, label: str | None = None) -> EvalResult:
    """Greedy-answer every question of a benchmark and score it the protocol's way.

    `model`: a LoadedModel or anything grace.load takes. `data`: a benchmark's files (the folder or file as
    published; `bench` names it when the path does not tell), "shapes-test", or a list of EvalItems.
    `out`: a JSONL file (or RecordLog) receiving every prompt and reply; `resume` reuses the replies already there.
    `progress`: True for a bar on stderr, or a callback (done, total)."""
    from ..load import LoadedModel, load

    protocol = get_protocol(protocol)
    bench, items = load_items(data, bench, limit, split)
    loaded = model if isinstance(model, LoadedModel) else load(model, device=device)
    label = label or str(loaded.source)
    log = RecordLog(out, resume) if isinstance(out, (str, Path)) else out
    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"{TITLES.get(bench, bench)} · {Path(label).name}", file=sys.stderr)
    records = []
    try:
        for index, item in enumerate(items):
            before = log.previous(bench, label, item) if log else None
            # reuse a saved reply only if it answered this very prompt; failed questions are asked again
            if before is not None and not before.get("error") and before.get("prompt") == build_prompt(item, protocol):
                record = score_one(item, before["answer"], protocol, prompt=before.get("prompt"), model=label)
            else:
                record = ask(loaded, item, protocol, label, max_new_tokens)
                if log:
                    log.write(record)
            records.append(record)
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(index + 1, len(items))
    finally:
        if bar is not None:
            bar.close()
        if log is not None and log is not out:
            log.close()
    return summarize(items, records, bench=bench, model=label)


def ask(loaded, item: EvalItem, protocol: Protocol, label: str | None, max_new_tokens: int | None = None) -> dict:
    """One question put to the model; a question that cannot be asked (unreadable picture, model error) is
    recorded with its reason and scored wrong, as the authors' scripts do, and the run goes on."""
    if item.error:
        return score_one(item, "", protocol, model=label)
    prompt = build_prompt(item, protocol)
    try:
        reply = generate(loaded, item.load_images(), prompt, max_new_tokens or protocol.max_new_tokens(item))
    except (ValueError, RuntimeError, OSError) as err:
        return score_one(item, "", protocol, prompt=prompt, model=label, error=str(err).splitlines()[0][:300])
    return score_one(item, reply, protocol, prompt=prompt, model=label)


def read_predictions(path: str | Path, bench: str | None = None) -> dict[str | None, dict[str, str]]:
    """Saved replies from a JSONL file (`{"id", "answer"}` a line, optionally "model" and "bench"), grouped by model."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"no predictions file {path}")
    groups: dict[str | None, dict[str, str]] = {}
    for number, record in enumerate(read_jsonl(path), 1):
        if "id" not in record or "answer" not in record:
            raise BenchmarkError(f"{path.name} record {number} lacks an \"id\" or an \"answer\"")
        if bench and record.get("bench") not in (None, bench):
            continue
        answer = record["answer"]
        groups.setdefault(record.get("model"), {})[id_key(record["id"])] = "" if answer is None else str(answer)
    return groups


def rescore(data, predictions: str | Path | dict[str, str], *, bench: str | None = None, protocol: str | Protocol = "grace",
            limit: int | None = None, split: str | None = None) -> dict[str | None, tuple[EvalResult, int]]:
    """Score saved replies against a benchmark's gold answers, per model found in the file:
    {model: (result, questions without a reply)}. A dict of replies {id: answer} scores one set."""
    bench, items = load_items(data, bench, limit, split)
    groups = {None: {id_key(k): v for k, v in predictions.items()}} if isinstance(predictions, dict) \
        else read_predictions(predictions, bench)
    if not groups:
        raise BenchmarkError(f"{predictions} holds no {TITLES.get(bench, bench)} answers")
    known = {id_key(item.id) for item in items}
    if not any(known & set(replies) for replies in groups.values()):
        raise BenchmarkError(f"no id in {predictions} matches a question of this {TITLES.get(bench, bench)} data "
                             f"(ids are the benchmark's own, e.g. {next(iter(known))})")
    return {model: score_replies(items, replies, protocol, bench=bench, model=model) for model, replies in groups.items()}


def dump_prompts(data, path: str | Path, *, bench: str | None = None, protocol: str | Protocol = "grace",
                 limit: int | None = None, split: str | None = None) -> int:
    """Write the exact prompt each question would get (one JSON object a line: id, prompt, images,
    max_new_tokens); returns how many were written."""
    protocol = get_protocol(protocol)
    bench, items = load_items(data, bench, limit, split)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            entry = {"bench": bench, "id": item.id, "prompt": None if item.error else build_prompt(item, protocol),
                     "images": len(item.image_sources), "max_new_tokens": protocol.max_new_tokens(item)}
            if item.error:
                entry["error"] = item.error
            f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    return len(items)
