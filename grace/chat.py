"""Asking a loaded model about an image: prompt building, streaming generation, timing, confidence, agreement.

Everything a user types goes through `build_inputs`, which neutralises chat-control and image tokens
(`<|im_start|>`, `<|image_pad|>`, ...) in the question, so the CLI, the library and the app all get a
prompt whose structure only the chat template decides.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from PIL import Image
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .cpu_decode import cache_kwargs
from .load import LoadedModel

MAX_ASPECT_RATIO = 200        # Qwen's image processor refuses longer strips
MAX_SEED = 2**63 - 1          # torch.manual_seed takes a signed 64-bit integer
MIN_TOKENS_FOR_SPEED = 8      # decode speed over fewer tokens is mostly timer noise
WORD_JOINER = "\u2060"        # invisible; splits a control token's text so the tokenizer cannot match it


class InvalidRequest(ValueError):
    """A question, image or generation setting the model cannot use; the message is a plain sentence."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = 0

    def checked(self) -> "GenerationSettings":
        """These settings, or InvalidRequest saying which one is wrong. Temperature and top-p matter
        (and are checked) only when sampling."""
        tokens = _number(self.max_new_tokens, "max_new_tokens")
        if tokens != int(tokens) or tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be a whole number of at least 1, got {tokens:g}.")
        temperature, top_p = self.temperature, self.top_p
        if self.do_sample:
            temperature = _number(temperature, "temperature")
            top_p = _number(top_p, "top_p")
            if not 0 < temperature <= 5:
                raise InvalidRequest(f"temperature must be above 0 and at most 5, got {temperature:g}.")
            if not 0 < top_p <= 1:
                raise InvalidRequest(f"top_p must be above 0 and at most 1, got {top_p:g}.")
        seed = self.seed
        if seed is not None:
            number = _number(seed, "seed")
            if number != int(number) or not 0 <= int(number) <= MAX_SEED:
                raise InvalidRequest(f"seed must be a whole number from 0 to {MAX_SEED}.")
            seed = int(number) if not isinstance(seed, int) else seed
        return replace(self, max_new_tokens=int(tokens), do_sample=bool(self.do_sample), temperature=temperature,
                       top_p=top_p, seed=seed)


def _number(value, name: str) -> float:
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a number.")
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{name} must be a number.") from None
    if not math.isfinite(number):
        raise InvalidRequest(f"{name} must be a finite number.")
    return number


@dataclass
class Generation:
    """A (partial or finished) answer with its timings and the model's confidence in each token."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_probs: list[float] = field(default_factory=list)      # p(token) under the model (temperature 1)
    token_entropies: list[float] = field(default_factory=list)  # entropy of that distribution, in nats
    answer_tokens: int = 0               # generated tokens without special ones (end-of-turn, padding)
    done: bool = False
    prompt_tokens: int = 0
    ttft_s: float | None = None          # time to first token
    total_s: float = 0.0
    weight_bytes: int = 0
    kv_cache_bytes: int | None = None    # the cache's own tensors at the end of the answer
    peak_bytes: int | None = None        # CUDA only: peak allocated on the device during this answer

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token (prefill excluded); None below MIN_TOKENS_FOR_SPEED tokens."""
        if self.ttft_s is None or len(self.token_ids) < MIN_TOKENS_FOR_SPEED or self.total_s <= self.ttft_s:
            return None
        return (len(self.token_ids) - 1) / (self.total_s - self.ttft_s)


def control_tokens(tokenizer) -> list[str]:
    """Texts the tokenizer turns into single added tokens (chat turns, image / video placeholders, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {getattr(t, "content", str(t)) for t in added.values()}
    texts.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted((t for t in texts if t), key=len, reverse=True)


def neutralise(text: str, tokenizer) -> str:
    """`text` with every control token spelled so it stays plain text (a word joiner after its first
    character): typed `<|im_end|><|im_start|>system` cannot end the user's turn or add an image."""
    tokens = control_tokens(tokenizer)
    for _ in range(8):   # a replacement cannot create a new match, but stay bounded anyway
        found = [t for t in tokens if t in text]
        if not found:
            break
        for token in found:
            text = text.replace(token, token[0] + WORD_JOINER + token[1:])
    return text


def check_image(image: Image.Image) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidRequest("The image is empty (zero width or height).")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidRequest(f"The image is {width}x{height} pixels, too long and thin for the model: its longer "
                             f"side may be at most {MAX_ASPECT_RATIO} times its shorter side. Crop or pad it.")
    return image


def build_messages(question: str, with_image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def build_inputs(processor, image: Image.Image | None, question: str, device: torch.device | str = "cpu"):
    if not question or not question.strip():
        raise InvalidRequest("Please type a question.")
    question = neutralise(question, processor.tokenizer)
    text = processor.apply_chat_template(build_messages(question, image is not None), add_generation_prompt=True)
    from .image_budget import fit_picture

    # past 1:200 refused in words (check_image); thinner than 1:8 padded so the pixel budget holds
    images = [fit_picture(check_image(image))] if image is not None else None
    return processor(text=[text], images=images, return_tensors="pt").to(device)


class _Confidence(LogitsProcessor):
    """Keeps the model's log-probabilities of the step being sampled (before temperature / top-p)."""

    def __init__(self):
        self.log_probs: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        self.log_probs = torch.log_softmax(scores[0].float(), dim=-1)
        return scores


class _QueueStreamer(BaseStreamer):
    """Hands (token id, probability, entropy) to the consumer thread; the first `put` is the prompt."""

    def __init__(self, confidence: _Confidence):
        self.queue: queue.Queue = queue.Queue()
        self.confidence = confidence
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        log_probs = self.confidence.log_probs
        for token in value.reshape(-1).tolist():
            if log_probs is None:
                self.queue.put((token, None, None))
                continue
            entropy = float(-(log_probs.exp() * log_probs).nan_to_num().sum())
            self.queue.put((token, float(log_probs[token].exp()), entropy))

    def end(self):
        self.queue.put(None)


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def cache_bytes(cache) -> int | None:
    """Bytes held by a generation cache's tensors (transformers' Cache classes or legacy tuples): each
    storage once, whole (a GrowingCache's keys are views of buffers with spare room, counted as held)."""
    if cache is None:
        return None
    seen, total = set(), 0

    def add(obj, depth=0):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (obj.device, storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for item in obj:
                add(item, depth + 1)
        elif depth < 4 and hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
            for item in vars(obj).values():
                add(item, depth + 1)

    add(cache)
    return total


def stream(loaded: LoadedModel, image: Image.Image | None, question: str,
           settings: GenerationSettings | None = None, stop: threading.Event | None = None) -> Iterator[Generation]:
    """Yield the growing answer after every new token; the last one has `done=True`.

    Raises InvalidRequest (a plain sentence) for an empty question, an unusable image or bad settings.
    Generation stops early when `stop` is set, or when the caller stops iterating (closing the
    generator), so an abandoned answer does not run on to max_new_tokens in the background.
    Sampling seeds torch's global RNG: answers sampled concurrently in one process are not reproducible.
    """
    settings = (settings or GenerationSettings()).checked()
    device = loaded.device
    inputs = build_inputs(loaded.processor, image, question, device)
    tokenizer = loaded.processor.tokenizer
    confidence = _Confidence()
    streamer = _QueueStreamer(confidence)
    cancel = stop or threading.Event()
    kwargs = dict(**inputs, max_new_tokens=settings.max_new_tokens, streamer=streamer, **cache_kwargs(loaded.model),
                  do_sample=settings.do_sample, pad_token_id=tokenizer.pad_token_id,
                  logits_processor=LogitsProcessorList([confidence]), return_dict_in_generate=True,
                  stopping_criteria=StoppingCriteriaList([_StopWhenSet(cancel)]))
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    errors: list[BaseException] = []
    finished: dict = {}

    def run():
        try:
            if settings.do_sample and settings.seed is not None:
                torch.manual_seed(settings.seed)
            with torch.inference_mode():
                output = loaded.model.generate(**kwargs)
            cache = getattr(output, "cache", None)
            if cache is None and "past_key_values" in getattr(output, "keys", lambda: ())():
                cache = output["past_key_values"]
            finished["kv_cache_bytes"] = cache_bytes(cache)
        except BaseException as err:  # surfaced to the consumer below
            errors.append(err)
            streamer.end()

    result = Generation(prompt_tokens=int(inputs["input_ids"].shape[1]), weight_bytes=loaded.weight_bytes)
    start = time.perf_counter()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    special = set(tokenizer.all_special_ids)
    try:
        while (item := streamer.queue.get()) is not None:
            token, prob, entropy = item
            now = time.perf_counter() - start
            if result.ttft_s is None:
                result.ttft_s = now
            result.token_ids.append(token)
            result.token_probs.append(prob)
            result.token_entropies.append(entropy)
            result.answer_tokens += token not in special
            result.total_s = now
            result.text = tokenizer.decode([t for t in result.token_ids if t not in special]).strip()
            yield replace(result, token_ids=list(result.token_ids), token_probs=list(result.token_probs),
                          token_entropies=list(result.token_entropies))   # a snapshot the caller may keep
    finally:   # also on GeneratorExit: the consumer went away, so stop generating
        cancel.set()
        worker.join()
    if errors:
        raise errors[0]
    result.total_s = time.perf_counter() - start
    result.kv_cache_bytes = finished.get("kv_cache_bytes")
    result.peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result.done = True
    yield result


def answer(loaded: LoadedModel, image: Image.Image | None, question: str,
           settings: GenerationSettings | None = None) -> Generation:
    final = Generation()
    for final in stream(loaded, image, question, settings):
        pass
    return final


def token_pieces(tokenizer, token_ids: list[int]) -> list[str]:
    """The text each token adds to the answer (special tokens give ''), for per-token views.

    A byte-level token can end mid-character: its piece is then the replacement character, and the
    token completing the character brings the character itself."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    pieces, previous = [], ""
    for i in range(len(token_ids)):
        text = tokenizer.decode([t for t in token_ids[: i + 1] if t not in special])
        pieces.append(text[len(os.path.commonprefix([text, previous])):])
        previous = text
    return pieces


def agreed_prefix(tokenizer, token_ids: list[int], index: int, text: str) -> str:
    """The start of `text` spelled by its first `index` tokens (the part shared with a reference).

    Byte-level tokens can end mid-character, so the decoded prefix is matched against the text
    rather than trusted alone."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    prefix = tokenizer.decode([t for t in token_ids[:index] if t not in special]).strip()
    return text[: len(os.path.commonprefix([text, prefix]))]


def token_agreement(reference: list[int], other: list[int]) -> tuple[int | None, float]:
    """(0-based index of the first differing token or None, share of positions with identical tokens)."""
    length = max(len(reference), len(other))
    if length == 0:
        return None, 1.0
    same = sum(a == b for a, b in zip(reference, other))
    first = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), None)
    if first is None and len(reference) != len(other):
        first = min(len(reference), len(other))
    return first, same / length
