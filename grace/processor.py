"""Qwen3-VL processor construction that works with or without torchvision.

transformers' `AutoProcessor` silently degrades to a bare tokenizer when the
video processor cannot be built (torchvision missing), and `Qwen3VLProcessor`
refuses `video_processor=None` in that case. GRACE only needs images, so when
torchvision is absent we build an image-only subclass; with torchvision we build
the full processor. Either way the result handles images, never just text.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the video processor (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        def token(name: str, default: str) -> str:
            return getattr(tokenizer, name, None) or default

        self.image_token = token("image_token", "<|image_pad|>")
        self.video_token = token("video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = None
        self.vision_start_token = token("vision_start_token", "<|vision_start|>")
        self.vision_end_token = token("vision_end_token", "<|vision_end|>")
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("this processor was built without torchvision and handles images only")
        return super().__call__(images=images, text=text, **kwargs)


def _chat_template(folder: Path, tokenizer) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def build_processor(folder: str | Path) -> Qwen3VLProcessor:
    """Build the Qwen3-VL processor stored in `folder` (no remote code, no network)."""
    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = AutoImageProcessor.from_pretrained(folder)
    chat_template = _chat_template(folder, tokenizer)
    if chat_template is None:
        raise ValueError(f"{folder} has no chat template (chat_template.jinja / chat_template.json)")
    if is_torchvision_available():
        from transformers import AutoVideoProcessor

        try:
            video_processor = AutoVideoProcessor.from_pretrained(folder)
        except (OSError, ValueError):
            # Checkpoints saved without torchvision carry no video config: use the model's defaults.
            from transformers import Qwen3VLVideoProcessor

            video_processor = Qwen3VLVideoProcessor()
        return Qwen3VLProcessor(image_processor, tokenizer, video_processor, chat_template=chat_template)
    return ImageOnlyQwen3VLProcessor(image_processor, tokenizer, chat_template=chat_template)
