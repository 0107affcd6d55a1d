"""LLaVA / ShareGPT4V conversation data -> token ids, answer-only labels and padded batches.

The JSON is a list of records:

    {"id": "...", "image": "images/0001.png", "type": "color",        (image and type optional)
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"},
                       {"from": "gpt", "value": "red"}, ...more turns...]}

`image` is relative to an image root (default: the JSON's folder). The `<image>` placeholder
marks where the image goes in the first human turn (absent: the image goes first). Turns become
chat messages (human -> user, gpt -> assistant) rendered by the processor's chat template.

Labels are -100 everywhere except the tokens of each assistant answer, including the
end-of-turn token (`<|im_end|>`) that closes it, so the loss only sees answers. The answer
span of assistant turn k is found from two renderings of the conversation: up to turn k with
the generation prompt (the prefix the model is given) and up to the end of turn k.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
END_OF_TURN = "<|im_end|>"


class DataError(ValueError):
    """A record or image of the training data cannot be used; the message names the file and sample."""


def read_records(json_path: str | os.PathLike) -> list[dict]:
    path = Path(json_path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such conversation file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} must hold a non-empty JSON list of conversation records")
    for index, record in enumerate(records):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{path}: record {index} has no 'conversations' list")
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
                raise DataError(f"{path}: record {index} (id {record.get('id')!r}) has a turn without a known "
                                f"'from' ({', '.join(ROLES)}) and a string 'value': {turn!r}")
        if not any(ROLES[t["from"]] == "assistant" for t in turns):
            raise DataError(f"{path}: record {index} (id {record.get('id')!r}) has no answer (gpt) turn to learn")
    return records


def open_image(path: Path, sample_id=None) -> Image.Image:
    """The image as RGB, fully decoded now, so a corrupt file fails here with its name."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} (sample {sample_id!r}) does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"image {path} (sample {sample_id!r}) is corrupt or not an image: {err}") from None


class ConversationDataset:
    """Records of a conversation JSON, each with its image opened (PIL) or None."""

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike | None = None):
        self.json_path = Path(json_path)
        self.records = read_records(self.json_path)
        self.image_root = Path(image_root) if image_root is not None else self.json_path.parent

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = dict(self.records[index])
        if record.get("image"):
            record["image"] = open_image(self.image_root / record["image"], record.get("id", index))
        return record


def build_messages(record: dict) -> list[dict]:
    """Chat messages of a record; the image goes where `<image>` was in the first human turn."""
    has_image = record.get("image") is not None
    messages, image_placed = [], not has_image
    for turn in record["conversations"]:
        role, value = ROLES[turn["from"]], turn["value"]
        if IMAGE_PLACEHOLDER in value and (role != "user" or image_placed):
            raise DataError(f"sample {record.get('id')!r}: '<image>' may appear once, in the first human turn "
                            f"of a record with an image")
        content = []
        if role == "user" and not image_placed:
            before, found, after = value.partition(IMAGE_PLACEHOLDER)
            if not found:                        # no placeholder: image first, as LLaVA does
                before, after = "", value
            # LLaVA writes "<image>\nQuestion": the newline only separates the placeholder.
            before, after = before.rstrip("\n"), after.lstrip("\n")
            content = ([{"type": "text", "text": before}] if before else []) + [{"type": "image"}]
            value = after
            image_placed = True
        if value or not content:
            content.append({"type": "text", "text": value})
        messages.append({"role": role, "content": content})
    return messages


class Collator:
    """Records -> a padded batch: input_ids, attention_mask, labels, mm_token_type_ids (right-padded)
    and, when any record has an image, pixel_values / image_grid_thw concatenated in batch order.

    max_length: drop tokens past it (answers that lose all their tokens simply count less);
    a record whose image tokens do not fit is an error rather than a silently broken sample.
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_turn_id = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.merge_size = processor.image_processor.merge_size
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_length = max_length

    def encode(self, record: dict) -> dict:
        """One record -> input_ids [L], labels [L] (+ pixel_values, image_grid_thw when it has an image)."""
        messages = build_messages(record)
        image = record.get("image")
        encoded, image_tokens = {}, 0
        if image is not None:
            if not isinstance(image, Image.Image):
                raise DataError(f"sample {record.get('id')!r}: 'image' must be a PIL image here, "
                                f"got {type(image).__name__}")
            pixels = self.processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")
            encoded = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
            image_tokens = int(pixels["image_grid_thw"][0].prod()) // self.merge_size ** 2

        def tokens(text: str) -> list[int]:
            # What the processor does: each image token stands for one merged patch of the image.
            text = text.replace(self.image_token, self.image_token * image_tokens, 1)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

        input_ids, labels = answer_only_labels(record, messages, self.processor.apply_chat_template, tokens,
                                               end_of_turn_id=self.end_of_turn_id)
        return finish_sample(encoded, record, input_ids, labels, self.max_length, self.image_token_id)

    def __call__(self, records: list[dict]) -> dict:
        encoded = [self.encode(r) for r in records]
        batch = pad_batch(encoded, self.pad_id)
        # Qwen3-VL's M-RoPE needs to know which tokens are image tokens (1) and which text (0).
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long() * batch["attention_mask"]
        with_image = [e for e in encoded if "pixel_values" in e]
        if with_image:
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_image])
            batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_image])
        return batch


def answer_only_labels(record: dict, messages: list[dict], render, tokens, end_of_turn_id: int | None = None):
    """(input_ids, labels) of a conversation with the loss on the assistant answers only.

    render: the chat template (messages -> text); tokens: text -> ids as the processor makes them
    (image placeholders expanded). Each answer is located as the tokens between the prompt rendered up
    to it and the conversation rendered through it, which must be prefixes of the whole; with
    end_of_turn_id the label span stops at (and includes) the answer's end-of-turn token."""
    full_text = render(messages, tokenize=False)
    input_ids = tokens(full_text)
    labels = [IGNORE_INDEX] * len(input_ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:k], tokenize=False, add_generation_prompt=True)
        through = render(messages[:k + 1], tokenize=False)
        start, end = len(tokens(prompt)), len(tokens(through))
        if not (full_text.startswith(through) and through.startswith(prompt) and input_ids[:end] == tokens(through)):
            raise DataError(f"sample {record.get('id')!r}: the chat template does not render turn {k} as a "
                            "prefix of the whole conversation, so its answer tokens cannot be located")
        span = input_ids[start:end]
        if end_of_turn_id is not None and end_of_turn_id in span:   # keep the answer through its end-of-turn token
            end = start + len(span) - span[::-1].index(end_of_turn_id)
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


def finish_sample(encoded: dict, record: dict, input_ids: list[int], labels: list[int], max_length: int | None,
                  image_token_id: int) -> dict:
    """Cut a sample to max_length (refusing one whose image tokens would be cut) and store its ids and labels."""
    if max_length is not None and len(input_ids) > max_length:
        if image_token_id in input_ids[max_length:]:
            raise DataError(f"sample {record.get('id')!r}: {len(input_ids)} tokens and its image does not fit "
                            f"in max_length={max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    encoded["input_ids"] = torch.tensor(input_ids, dtype=torch.long)
    encoded["labels"] = torch.tensor(labels, dtype=torch.long)
    return encoded


def pad_batch(encoded: list[dict], pad_id: int) -> dict:
    """Right-pad encoded samples into input_ids / attention_mask / labels (padding ignored by the loss)."""
    length = max(len(e["input_ids"]) for e in encoded)
    batch = {"input_ids": torch.full((len(encoded), length), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(encoded), length), dtype=torch.long),
             "labels": torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)}
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = e["input_ids"]
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = e["labels"]
    return batch
