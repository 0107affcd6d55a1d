"""What GRACE training needs to know about a LLaVA-1.5 student / teacher.

- which linears QAT quantizes: the language model's (the original release skips mm_projector,
  vision_tower, lm_head and embed_tokens), and which parameters stay frozen (the CLIP tower);
- how many placeholder tokens each image takes (fixed: one per patch, CLS dropped), for R-CKA over
  the image tokens;
- `LlavaCollator`: conversations -> input ids (BOS once, each `<image>` expanded), answer-only labels
  (each ASSISTANT answer through its `</s>`), pixel values; the same contract as the Qwen3-VL collator.
"""

from __future__ import annotations

import torch
from PIL import Image

QAT_SKIP_KEYWORDS = ("vision_tower", "multi_modal_projector", "lm_head", "embed_tokens")
VISION_KEYWORD = "vision_tower"


def is_llava_model(model) -> bool:
    return getattr(model.config, "model_type", None) == "llava"


def tokens_per_image(config) -> int:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches if config.vision_feature_select_strategy == "default" else patches + 1


def image_grid(config, num_images: int) -> torch.Tensor:
    """Per-image token counts in the `image_grid_thw` form R-CKA reads with merge_size 1: [[1, n, 1], ...]."""
    return torch.tensor([[1, tokens_per_image(config), 1]] * num_images, dtype=torch.long)


class LlavaCollator:
    """Records ({"conversations": [...], "image": PIL or None}) -> a padded batch for a LLaVA model."""

    def __init__(self, processor, max_length: int | None = None):
        from ..data.conversations import build_messages

        self.build_messages = build_messages
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.end_of_turn_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_length = max_length

    def _tokens(self, text: str, image_tokens: int) -> list[int]:
        return self.tokenizer(text.replace(self.image_token, self.image_token * image_tokens))["input_ids"]

    def encode(self, record: dict) -> dict:
        from ..data.conversations import DataError, answer_only_labels, finish_sample

        messages = self.build_messages(record)
        image = record.get("image")
        encoded, image_tokens = {}, 0
        if image is not None:
            if not isinstance(image, Image.Image):
                raise DataError(f"sample {record.get('id')!r}: 'image' must be a PIL image here")
            encoded["pixel_values"] = self.processor.image_processor(images=[image.convert("RGB")],
                                                                     return_tensors="pt")["pixel_values"]
            height, width = encoded["pixel_values"].shape[-2:]
            image_tokens = (height // self.processor.patch_size) * (width // self.processor.patch_size) \
                + self.processor.num_additional_image_tokens - (self.processor.vision_feature_select_strategy == "default")
        input_ids, labels = answer_only_labels(record, messages, self.processor.apply_chat_template,
                                               lambda text: self._tokens(text, image_tokens))
        return finish_sample(encoded, record, input_ids, labels, self.max_length, self.image_token_id)

    def __call__(self, records: list[dict]) -> dict:
        from ..data.conversations import pad_batch

        encoded = [self.encode(r) for r in records]
        batch = pad_batch(encoded, self.pad_id)
        with_image = [e for e in encoded if "pixel_values" in e]
        if with_image:
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_image])
        return batch


# -- what the trainer asks, per architecture (Qwen3-VL answers with its own defaults) ----------------------

def vision_keyword(model, default: str = "visual") -> str:
    """The name part of the parameters `freeze_vision` freezes."""
    return VISION_KEYWORD if is_llava_model(model) else default


def projector_keyword(model, default: str = "merger") -> str:
    """The vision-to-language connector (trained with `train_merger`)."""
    return "multi_modal_projector" if is_llava_model(model) else default


def qat_skip_keywords(model, default: tuple[str, ...]) -> tuple[str, ...]:
    return QAT_SKIP_KEYWORDS if is_llava_model(model) else tuple(default)


def rcka_image_grid(model, inputs: dict):
    """(image_grid_thw, merge_size) for `rcka_loss`: Qwen3-VL's from its processor; LLaVA's fixed count per image."""
    if is_llava_model(model):
        pixels = inputs.get("pixel_values")
        return (None if pixels is None else image_grid(model.config, pixels.shape[0])), 1
    return inputs.get("image_grid_thw"), model.config.vision_config.spatial_merge_size


def collator(processor, max_length: int | None = None):
    """The batch builder for the processor's model: LlavaCollator for LLaVA, the Qwen3-VL collator otherwise."""
    from transformers import LlavaProcessor

    if isinstance(processor, LlavaProcessor):
        return LlavaCollator(processor, max_length)
    from ..data.conversations import Collator

    return Collator(processor, max_length)


def release_name(model, name: str) -> str:
    """A model module / tensor name as the model's QAT release sidecar writes it."""
    if is_llava_model(model):
        from .naming import to_original

        return to_original(name) or name
    return name
