"""One comparison: the variants of a family answer one question about one image at the same time.

`CompareRun` starts a thread per variant (load through the shared cache, then `grace.chat.stream`);
`updates()` yields whenever any column changed, so every column streams at once. No gradio here:
the Compare tab renders these columns, the `compare` API returns `result()`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from grace.chat import MIN_TOKENS_FOR_SPEED, InvalidRequest, agreed_prefix, token_agreement, token_pieces

from . import validate
from .families import Family
from .model_cache import CacheError, ModelCache, human_bytes

log = logging.getLogger(__name__)

MAX_COLUMNS = 4
UPDATES_PER_S = 8            # streaming UI refresh rate; tokens arrive much faster on small models


@dataclass
class Column:
    label: str
    kind: str
    source: str
    status: str = "waiting"            # waiting | loading | answering | done | error
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_probs: list[float] = field(default_factory=list)
    token_entropies: list[float] = field(default_factory=list)
    answer_tokens: int = 0             # without special tokens
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    total_s: float | None = None
    weight_bytes: int | None = None
    kv_cache_bytes: int | None = None
    peak_bytes: int | None = None      # CUDA only: peak allocated during the answer
    load_s: float | None = None
    seen_as: str | None = None         # how the model sees the picture ("seen as 192×128, 24 visual tokens")
    error: str | None = None
    first_divergence: int | None = None   # 0-based index of the first token that differs from the reference
    share_identical: float | None = None
    agreed_text: str = ""              # the part of `text` made of tokens identical to the reference's
    tokenizer: object = None

    @property
    def first_diverging_token(self) -> int | None:
        """The same position, counted from 1 as people count tokens."""
        return None if self.first_divergence is None else self.first_divergence + 1

    def pieces(self) -> list[str]:
        return token_pieces(self.tokenizer, self.token_ids) if self.tokenizer is not None else []

    def as_dict(self, with_tokens: bool = False) -> dict:
        result = {"label": self.label, "kind": self.kind, "status": self.status, "text": self.text,
                  "tokens": self.answer_tokens, "generated_tokens": len(self.token_ids), "ttft_s": self.ttft_s,
                  "tokens_per_s": self.tokens_per_s, "total_s": self.total_s, "weight_bytes": self.weight_bytes,
                  "kv_cache_bytes": self.kv_cache_bytes, "peak_bytes": self.peak_bytes, "load_s": self.load_s,
                  "seen_as": self.seen_as, "first_diverging_token": self.first_diverging_token, "share_identical": self.share_identical,
                  "mean_token_prob": mean(self.token_probs), "error": self.error}
        if with_tokens:
            result["per_token"] = [{"position": i + 1, "id": t, "text": piece, "prob": p, "entropy": h}
                                   for i, (t, piece, p, h) in enumerate(zip(self.token_ids, self.pieces(),
                                                                            self.token_probs, self.token_entropies))]
        return result


def describe_view(loaded, image) -> str | None:
    """How this model sees the picture, or None when that cannot be said (no picture, a processor without a budget)."""
    from grace import seen_as

    if image is None:
        return None
    try:
        return seen_as(loaded, image).describe()
    except Exception:  # a line of the view; never worth failing the answer for
        log.debug("could not describe how %s sees the picture", getattr(loaded, "source", "?"), exc_info=True)
        return None


def mean(values: list) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


class CompareRun:
    """Threads answering one question with several variants; `updates()` yields as they progress."""

    def __init__(self, cache: ModelCache, family: Family, labels: list[str], image, question: str, generation):
        self.cache = cache
        self.family = family.name
        self.columns = [Column(v.label, v.kind, v.source) for v in map(family.variant, labels)]
        self.reference = family.reference(labels)
        self.image = image
        self.question = question
        self.generation = generation
        self._changed = threading.Condition()
        self._version = 0
        self._stop = threading.Event()
        self.final = False             # set by updates(): the state it yields is the last one

    def start(self) -> "CompareRun":
        for column in self.columns:
            threading.Thread(target=self._answer, args=(column,), daemon=True, name=f"compare-{column.label}").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def finished(self) -> bool:
        return all(c.status in ("done", "error") for c in self.columns)

    def _bump(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _answer(self, column: Column) -> None:
        from grace.chat import stream
        from grace.errors import GraceLoadError

        try:
            column.status = "answering" if self.cache.is_loaded(column.source) else "loading"
            self._bump()
            started = time.perf_counter()
            with self.cache.use(column.source) as loaded:
                if column.status == "loading":
                    column.load_s = time.perf_counter() - started
                column.status = "answering"
                column.tokenizer = loaded.processor.tokenizer
                column.weight_bytes = loaded.weight_bytes
                column.seen_as = describe_view(loaded, self.image)
                self._bump()
                for generation in stream(loaded, self.image, self.question, self.generation):
                    column.text, column.token_ids = generation.text, generation.token_ids
                    column.token_probs, column.token_entropies = generation.token_probs, generation.token_entropies
                    column.answer_tokens = generation.answer_tokens
                    column.ttft_s, column.total_s = generation.ttft_s, generation.total_s
                    column.tokens_per_s = generation.tokens_per_s
                    column.kv_cache_bytes, column.peak_bytes = generation.kv_cache_bytes, generation.peak_bytes
                    self._bump()
                    if self._stop.is_set():   # the user went away: closing the stream stops generate()
                        break
            column.status = "done"
        except (GraceLoadError, CacheError) as err:
            log.info("variant %s could not be loaded: %s", column.label, err)
            # The operator's folder names stay on the server: the message names the column instead.
            message = str(err).replace(str(Path(column.source).resolve()), column.label).replace(column.source,
                                                                                                 column.label)
            column.error, column.status = f"Could not load this model: {message}", "error"
        except InvalidRequest as err:
            log.info("variant %s refused the request: %s", column.label, err)
            column.error, column.status = str(err), "error"
        except Exception:  # one failing variant must not take the others or the server down
            log.exception("variant %s failed", column.label)
            doing = "loading this model" if column.status == "loading" else "answering"
            column.error, column.status = (f"Something went wrong while {doing}; the other columns are not "
                                           "affected. The server log has the details."), "error"
        finally:
            self._bump()

    def _agreement(self) -> None:
        ref = next((c for c in self.columns if c.label == self.reference), None)
        for column in self.columns:
            column.first_divergence = column.share_identical = None
            column.agreed_text = column.text
            if ref is None or column is ref or not column.token_ids or not ref.token_ids:
                continue
            first, share = token_agreement(ref.token_ids, column.token_ids)
            column.first_divergence, column.share_identical = first, share
            if first is not None and column.tokenizer is not None:
                column.agreed_text = agreed_prefix(column.tokenizer, column.token_ids, first, column.text)

    def updates(self):
        """Yield self after every batch of changes (at most UPDATES_PER_S a second) until all are finished; the
        last one has `final` True. Whether it is the last is decided before the yield: a column that finishes
        while the caller renders a yield gets one more (it used to end the loop unseen, leaving it
        "answering…" on screen)."""
        seen = -1
        try:
            while True:
                with self._changed:
                    if self._version == seen and not self.finished:
                        self._changed.wait(timeout=1.0)
                    seen = self._version
                    self.final = self.finished
                self._agreement()
                yield self
                if self.final:
                    return
                time.sleep(1.0 / UPDATES_PER_S)
        finally:
            self.stop()

    def result(self, with_tokens: bool = False) -> dict:
        settings = self.generation
        return {"family": self.family, "question": self.question, "reference": self.reference,
                "settings": {"max_new_tokens": settings.max_new_tokens, "sampling": settings.do_sample,
                             "temperature": settings.temperature if settings.do_sample else None,
                             "top_p": settings.top_p if settings.do_sample else None,
                             "seed": settings.seed if settings.do_sample else None},
                "min_tokens_for_speed": MIN_TOKENS_FOR_SPEED,
                "columns": [c.as_dict(with_tokens) for c in self.columns]}


def parse_variants(text: str | list | None, family: Family) -> list[str]:
    """Variant labels from the API ('' = the family's defaults, a JSON list, or comma-separated)."""
    if isinstance(text, list):
        return [str(x) for x in text]
    if not text or not str(text).strip():
        return family.default_labels
    if str(text).strip().startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError:
            labels = None
        if not isinstance(labels, list):
            raise validate.InvalidInput("variants must be a JSON list of labels or comma-separated labels")
        return [str(x) for x in labels]
    return [part.strip() for part in str(text).split(",") if part.strip()]


def check_labels(labels: list[str], family: Family) -> list[str]:
    labels = list(dict.fromkeys(labels or []))
    if not labels:
        raise validate.InvalidInput("Pick at least one model variant to compare.")
    if len(labels) > MAX_COLUMNS:
        raise validate.InvalidInput(f"At most {MAX_COLUMNS} variants can answer at once; {len(labels)} were picked.")
    for label in labels:
        family.variant(label)   # KeyError naming the family's variants
    return labels


# -- the download --------------------------------------------------------------------------------------

def _cell(value, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def markdown_table(result: dict) -> str:
    """The comparison as a Markdown table (for a paper draft or an issue report)."""
    settings = result["settings"]
    mode = "greedy" if not settings["sampling"] else \
        f"sampling (T={settings['temperature']}, top-p={settings['top_p']}, seed={settings['seed']})"
    lines = [f"**Question:** {result['question']}  ", f"**Family:** {result['family']} · {mode}, "
             f"at most {settings['max_new_tokens']} new tokens · agreement against {result['reference']}", "",
             "| variant | kind | answer | tokens | first token (s) | tokens/s | total (s) | weights | KV cache "
             "| mean p(token) | first diverging token | identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["columns"]:
        answer = (c["text"] if c["status"] == "done" else f"error: {c['error']}").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {c['label']} | {c['kind']} | {answer} | {c['tokens']} | {_cell(c['ttft_s'])} | "
                     f"{_cell(c['tokens_per_s'], '{:.1f}')} | {_cell(c['total_s'])} | {human_bytes(c['weight_bytes'])} "
                     f"| {human_bytes(c['kv_cache_bytes'])} | {_cell(c['mean_token_prob'], '{:.3f}')} | "
                     f"{_cell(c['first_diverging_token'], '{}')} | {_cell(c['share_identical'], '{:.0%}')} |")
    lines += ["", f"tokens/s is shown only for answers of at least {result['min_tokens_for_speed']} tokens; "
                  "token positions count from 1."]
    return "\n".join(lines) + "\n"


def write_downloads(result: dict, folder: Path) -> list[str]:
    """comparison.json and comparison.md in `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    as_json, as_md = folder / "comparison.json", folder / "comparison.md"
    as_json.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    as_md.write_text(markdown_table(result), encoding="utf-8")
    return [str(as_json), str(as_md)]
