"""Conversation JSON -> tokens, answer-only labels and padded batches, on a tiny model's real processor."""

import json

import pytest
import torch
from PIL import Image

from grace.chat import build_inputs
from grace.data.conversations import Collator, ConversationDataset, DataError, build_messages, read_records
from grace.data.shapes import make_sample, write_split
from grace.tiny import TinyConfig, tiny_qwen3vl


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)   # two shared cores: one thread avoids oversubscription stalls
    return tiny_qwen3vl(0, TinyConfig(image_size=128))


def record(*turns, image=None, id="r"):
    roles = ["human", "gpt"] * len(turns)
    return {"id": id, "image": image, "conversations": [{"from": r, "value": v} for r, v in zip(roles, turns)]}


def labelled_spans(input_ids, labels):
    """Runs of consecutive labelled positions, as token-id lists."""
    spans, current = [], []
    for token, label in zip(input_ids.tolist(), labels.tolist()):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_labels_cover_exactly_each_answer_and_its_end_of_turn(tiny):
    _, processor = tiny
    image = make_sample("train", 0, 0).image
    r = record("<image>\nWhat color is the circle?", "red", "Is there a blue square?", "no", image=image)
    encoded = Collator(processor).encode(r)
    tokenizer = processor.tokenizer
    spans = [tokenizer.decode(span) for span in labelled_spans(encoded["input_ids"], encoded["labels"])]
    assert spans == ["red<|im_end|>", "no<|im_end|>"]
    # The token after each labelled span (the template's newline) and every prompt token stay unlabelled.
    labelled = (encoded["labels"] != -100).sum().item()
    answer_tokens = len(tokenizer("red<|im_end|>no<|im_end|>", add_special_tokens=False)["input_ids"])
    assert labelled == answer_tokens


def test_prompt_prefix_is_what_inference_sees(tiny):
    """Tokens before the first answer = chat.build_inputs for the same question (the model is trained on
    exactly the prompt it is later asked with), image tokens and pixels as the processor makes them."""
    _, processor = tiny
    image = make_sample("train", 0, 1).image
    encoded = Collator(processor).encode(record("<image>\nHow many shapes are there?", "two", image=image))
    reference = build_inputs(processor, image, "How many shapes are there?")
    prompt_length = reference["input_ids"].shape[1]
    assert encoded["input_ids"][:prompt_length].tolist() == reference["input_ids"][0].tolist()
    assert (encoded["labels"][:prompt_length] == -100).all() and encoded["labels"][prompt_length] != -100
    assert torch.equal(encoded["pixel_values"], reference["pixel_values"])
    assert torch.equal(encoded["image_grid_thw"], reference["image_grid_thw"])
    full = processor(text=[processor.apply_chat_template(build_messages(
        record("<image>\nHow many shapes are there?", "two", image=image)))], images=[image], return_tensors="pt")
    assert encoded["input_ids"].tolist() == full["input_ids"][0].tolist()
    batch = Collator(processor)([record("<image>\nHow many shapes are there?", "two", image=image)])
    assert torch.equal(batch["mm_token_type_ids"], full["mm_token_type_ids"])


def test_image_goes_where_the_placeholder_was():
    img = Image.new("RGB", (8, 8))
    assert build_messages(record("<image>\nQ?", "a", image=img))[0]["content"] == [
        {"type": "image"}, {"type": "text", "text": "Q?"}]
    assert build_messages(record("Look:\n<image>\nQ?", "a", image=img))[0]["content"] == [
        {"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": "Q?"}]
    assert build_messages(record("Q?", "a", image=img))[0]["content"] == [
        {"type": "image"}, {"type": "text", "text": "Q?"}]
    messages = build_messages(record("Q?", "a", "R?", "b"))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert all({"type": "image"} not in m["content"] for m in messages)
    with pytest.raises(DataError, match="once"):
        build_messages(record("<image>\nQ?", "a", "<image> again", "b", image=img))


def test_batch_of_mixed_sizes_pads_right_and_matches_single_forward(tiny):
    model, processor = tiny
    records = [record("<image>\nDescribe the image.", "a red circle", image=make_sample("train", 0, 2).image),
               record("<image>\nWhat shape is on the left?", "square", image=Image.new("RGB", (200, 90), "white")),
               record("Say yes.", "yes")]
    collator = Collator(processor)
    batch = collator(records)
    singles = [collator.encode(r) for r in records]
    lengths = [len(s["input_ids"]) for s in singles]
    assert batch["input_ids"].shape == (3, max(lengths))
    grids = [s["image_grid_thw"] for s in singles[:2]]
    assert not torch.equal(grids[0], grids[1])                  # the two images have different patch grids
    assert torch.equal(batch["image_grid_thw"], torch.cat(grids))
    assert batch["pixel_values"].shape[0] == sum(int(g.prod()) for g in grids)
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][row, n:] == -100).all()
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
    for row, grid in enumerate(grids):
        assert (batch["input_ids"][row] == collator.image_token_id).sum() == grid.prod() // 4
    # The padded batch means to the model what each sample means alone.
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        batched = model(**inputs).logits
        for row, single in enumerate(singles):
            alone = {"input_ids": single["input_ids"][None],
                     "attention_mask": torch.ones_like(single["input_ids"])[None],
                     "mm_token_type_ids": (single["input_ids"] == collator.image_token_id).long()[None]}
            if "pixel_values" in single:
                alone.update(pixel_values=single["pixel_values"], image_grid_thw=single["image_grid_thw"])
            expected = model(**alone).logits[0]
            assert torch.allclose(batched[row, :lengths[row]], expected, atol=1e-4)


def test_max_length_truncates_text_but_never_an_image(tiny):
    _, processor = tiny
    r = record("<image>\nDescribe the image.", "a red circle and a blue square", image=make_sample("train", 0, 3).image)
    full = Collator(processor).encode(r)
    cut = Collator(processor, max_length=len(full["input_ids"]) - 3).encode(r)
    assert cut["input_ids"].tolist() == full["input_ids"][:-3].tolist()
    assert cut["labels"].tolist() == full["labels"][:-3].tolist()
    with pytest.raises(DataError, match="max_length=5"):
        Collator(processor, max_length=5).encode(r)


def test_dataset_reads_images_relative_to_the_json_or_a_root(tmp_path):
    path = write_split(tmp_path / "data", "test", 3)
    dataset = ConversationDataset(path)
    assert len(dataset) == 3 and dataset[1]["image"].size == (64, 64)
    moved = tmp_path / "elsewhere.json"
    moved.write_text(path.read_text())
    assert ConversationDataset(moved, image_root=tmp_path / "data")[0]["image"].mode == "RGB"
    with pytest.raises(DataError, match="does not exist"):
        ConversationDataset(moved)[0]


def test_missing_or_corrupt_images_and_bad_records_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    data = [record("<image>\nQ?", "a", image="gone.png", id="s1"),
            record("<image>\nQ?", "a", image="broken.png", id="s2")]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    dataset = ConversationDataset(path)
    with pytest.raises(DataError, match=r"gone\.png.*'s1'.*does not exist"):
        dataset[0]
    with pytest.raises(DataError, match=r"broken\.png.*'s2'.*corrupt"):
        dataset[1]
    for content, message in [([{"id": 1}], "no 'conversations'"),
                             ([record("Q?", "a") | {"conversations": [{"from": "bot", "value": "x"}]}], "known 'from'"),
                             ([{"conversations": [{"from": "human", "value": "Q?"}]}], "no answer"),
                             ({}, "non-empty JSON list")]:
        path.write_text(json.dumps(content))
        with pytest.raises(DataError, match=message):
            read_records(path)
    path.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_records(path)
