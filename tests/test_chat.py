"""Streaming answers, early stop, agreement, and concurrent loads."""

import threading
import time

import torch
from PIL import Image

import grace
from grace.chat import GenerationSettings, agreed_prefix, answer, stream, token_agreement


def test_stream_grows_and_matches_answer(fixtures_dir):
    loaded = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu", dtype=torch.float32)
    image = Image.open(fixtures_dir / "qwen3vl-tiny-bf16" / "image.png")
    steps = list(stream(loaded, image, "Describe this image.", GenerationSettings(max_new_tokens=6)))
    lengths = [len(s.token_ids) for s in steps]
    assert lengths[:-1] == list(range(1, len(steps))) and steps[-1].done
    final = answer(loaded, image, "Describe this image.", GenerationSettings(max_new_tokens=6))
    assert final.token_ids == steps[-1].token_ids and final.ttft_s is not None and final.total_s >= final.ttft_s


def test_closing_the_stream_stops_generation(fixtures_dir):
    loaded = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu", dtype=torch.float32)
    calls = []

    def slow_count(module, args, output):
        calls.append(1)
        time.sleep(0.01)

    loaded.model.lm_head.register_forward_hook(slow_count)
    gen = stream(loaded, None, "Hello", GenerationSettings(max_new_tokens=200))
    for step in gen:
        if len(step.token_ids) >= 3:
            break
    gen.close()            # what a consumer leaving does; generate() must end rather than run 200 tokens
    assert len(calls) < 20


def test_stop_event(fixtures_dir):
    loaded = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu", dtype=torch.float32)
    stop = threading.Event()
    stop.set()
    result = list(stream(loaded, None, "Hello", GenerationSettings(max_new_tokens=50), stop=stop))[-1]
    assert result.done and len(result.token_ids) <= 1


def test_token_agreement():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == (None, 1.0)
    assert token_agreement([1, 2, 3, 4], [1, 9, 3, 4]) == (1, 0.75)
    assert token_agreement([1, 2], [1, 2, 3, 4]) == (2, 0.5)
    assert token_agreement([], []) == (None, 1.0)


def test_agreed_prefix(fixtures_dir):
    tokenizer = grace.load(fixtures_dir / "qwen3vl-tiny-bf16", device="cpu").processor.tokenizer
    ids = tokenizer("a red circle and a blue square")["input_ids"]
    text = tokenizer.decode(ids)
    prefix = agreed_prefix(tokenizer, ids, 3, text)
    assert text.startswith(prefix) and 0 < len(prefix) < len(text)
    assert agreed_prefix(tokenizer, ids, len(ids), text) == text


def test_concurrent_loads_do_not_interfere(fixtures_dir):
    results, errors = {}, []

    def load(name):
        try:
            results[name] = grace.load(fixtures_dir / name, device="cpu", dtype=torch.float32)
        except Exception as err:   # surfaced by the assertion below
            errors.append(err)

    names = ["qwen3vl-tiny-bf16", "qwen3vl-tiny-grace-w4g128-awq", "qwen3vl-tiny-grace-w8g128-qat",
             "qwen3vl-tiny-hf-awq"] * 2
    threads = [threading.Thread(target=load, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for loaded in results.values():
        assert not any(t.is_meta for t in list(loaded.model.parameters()) + list(loaded.model.buffers()))
