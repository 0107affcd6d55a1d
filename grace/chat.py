"""Asking a loaded model about an image: prompt building, streaming generation, timing, agreement."""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from PIL import Image
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .load import LoadedModel


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = 0


@dataclass
class Generation:
    """A (partial or finished) answer with its timings."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    prompt_tokens: int = 0
    ttft_s: float | None = None          # time to first token
    total_s: float = 0.0
    weight_bytes: int = 0
    peak_bytes: int | None = None        # CUDA: peak allocated during this answer; CPU: process peak RSS

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token (prefill excluded)."""
        if self.ttft_s is None or len(self.token_ids) < 2 or self.total_s <= self.ttft_s:
            return None
        return (len(self.token_ids) - 1) / (self.total_s - self.ttft_s)


def build_messages(question: str, with_image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def build_inputs(processor, image: Image.Image | None, question: str, device: torch.device | str = "cpu"):
    text = processor.apply_chat_template(build_messages(question, image is not None), add_generation_prompt=True)
    images = [image.convert("RGB")] if image is not None else None
    return processor(text=[text], images=images, return_tensors="pt").to(device)


class _QueueStreamer(BaseStreamer):
    """Hands each generated token id to the consumer thread; the first `put` is the prompt."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(token)

    def end(self):
        self.queue.put(None)


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB
    except (ImportError, OSError):
        return None


def stream(loaded: LoadedModel, image: Image.Image | None, question: str,
           settings: GenerationSettings | None = None, stop: threading.Event | None = None) -> Iterator[Generation]:
    """Yield the growing answer after every new token; the last one has `done=True`.

    Generation stops early when `stop` is set, or when the caller stops iterating (closing the
    generator), so an abandoned answer does not run on to max_new_tokens in the background.
    Sampling seeds torch's global RNG: answers sampled concurrently in one process are not reproducible.
    """
    settings = settings or GenerationSettings()
    device = loaded.device
    inputs = build_inputs(loaded.processor, image, question, device)
    tokenizer = loaded.processor.tokenizer
    streamer = _QueueStreamer()
    cancel = stop or threading.Event()
    kwargs = dict(**inputs, max_new_tokens=settings.max_new_tokens, streamer=streamer,
                  do_sample=settings.do_sample, pad_token_id=tokenizer.pad_token_id,
                  stopping_criteria=StoppingCriteriaList([_StopWhenSet(cancel)]))
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    errors: list[BaseException] = []

    def run():
        try:
            if settings.do_sample and settings.seed is not None:
                torch.manual_seed(settings.seed)
            with torch.inference_mode():
                loaded.model.generate(**kwargs)
        except BaseException as err:  # surfaced to the consumer below
            errors.append(err)
            streamer.end()

    result = Generation(prompt_tokens=int(inputs["input_ids"].shape[1]), weight_bytes=loaded.weight_bytes)
    start = time.perf_counter()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    special = set(tokenizer.all_special_ids)
    try:
        while (token := streamer.queue.get()) is not None:
            now = time.perf_counter() - start
            if result.ttft_s is None:
                result.ttft_s = now
            result.token_ids.append(token)
            result.total_s = now
            result.text = tokenizer.decode([t for t in result.token_ids if t not in special]).strip()
            yield replace(result, token_ids=list(result.token_ids))   # a snapshot the caller may keep
    finally:   # also on GeneratorExit: the consumer went away, so stop generating
        cancel.set()
        worker.join()
    if errors:
        raise errors[0]
    result.total_s = time.perf_counter() - start
    result.peak_bytes = _peak_bytes(device)
    result.done = True
    yield result


def answer(loaded: LoadedModel, image: Image.Image | None, question: str,
           settings: GenerationSettings | None = None) -> Generation:
    final = Generation()
    for final in stream(loaded, image, question, settings):
        pass
    return final


def agreed_prefix(tokenizer, token_ids: list[int], index: int, text: str) -> str:
    """The start of `text` spelled by its first `index` tokens (the part shared with a reference).

    Byte-level tokens can end mid-character, so the decoded prefix is matched against the text
    rather than trusted alone."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    prefix = tokenizer.decode([t for t in token_ids[:index] if t not in special]).strip()
    return text[: len(os.path.commonprefix([text, prefix]))]


def token_agreement(reference: list[int], other: list[int]) -> tuple[int | None, float]:
    """(index of the first differing token or None, share of positions with identical tokens)."""
    length = max(len(reference), len(other))
    if length == 0:
        return None, 1.0
    same = sum(a == b for a, b in zip(reference, other))
    first = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), None)
    if first is None and len(reference) != len(other):
        first = min(len(reference), len(other))
    return first, same / length
