"""The LLaVA-1.5 processor: SentencePiece tokenizer, pad-to-square CLIP image processing, vicuna_v1 prompt.

Built as transformers' own `LlavaProcessor` around
- the checkpoint's `tokenizer.model` (Llama's SentencePiece, byte fallback) with `<image>` added as
  the placeholder token at id = vocabulary size (the id the model config uses);
- `LlavaImageProcessorPil` with the tower's CLIP settings and, for `image_aspect_ratio: "pad"`, LLaVA's
  `expand2square`: pad to a square with the mean colour int(mean * 255), image centred, before the
  bicubic shortest-edge resize and centre crop. The PIL backend needs no torchvision;
- the vicuna_v1 conversation as the chat template. Every image becomes `<image>\n` in front of the
  text (LLaVA puts the image first), and the processor expands each `<image>` into one placeholder
  per image feature (patches, without CLS).
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from ..errors import GraceLoadError
from .config import IMAGE_TOKEN

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# conv_vicuna_v1 (sep_style TWO, seps " " and "</s>"): "SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:".
# Text that spells a control token ("<image>", "<s>", "</s>") gets a space inside it, so what a user
# types is never read as an image placeholder or a turn boundary.
_SAFE = "| replace('<image>', '< image>') | replace('</s>', '< /s>') | replace('<s>', '< s>')"
VICUNA_V1_TEMPLATE = (
    "{% set ns = namespace(system='" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') %}"
    "{% endif %}{% endfor %}{{ ns.system }} "
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ 'USER: ' if message['role'] == 'user' else 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] " + _SAFE + " }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] " + _SAFE + " }}{% endif %}{% endfor %}"
    "{% endif %}{{ '</s>' if message['role'] == 'assistant' else ' ' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(folder: Path, image_token_id: int):
    """The checkpoint's SentencePiece tokenizer with `<image>` at `image_token_id`."""
    from transformers import LlamaTokenizer

    if not (folder / "tokenizer.model").is_file():
        raise GraceLoadError(f"{folder} has no tokenizer.model: a LLaVA-1.5 checkpoint carries its SentencePiece "
                             "tokenizer there; copy it from the original release")
    try:
        tokenizer = LlamaTokenizer.from_pretrained(folder)
    except ImportError as err:
        raise GraceLoadError(f"reading {folder}/tokenizer.model needs the sentencepiece and protobuf packages "
                             f"(pip install sentencepiece protobuf): {err}") from None
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        raise GraceLoadError(f"{folder}/tokenizer.model is not a readable SentencePiece model: {err}") from None
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    got = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if got != image_token_id:
        raise GraceLoadError(f"{folder}: the tokenizer has {got} pieces before <image>, the config says "
                             f"vocab_size {image_token_id}: tokenizer.model does not belong to this model")
    tokenizer.image_token = IMAGE_TOKEN
    return tokenizer


def build_image_processor(preprocessor: dict, pad_to_square: bool) -> LlavaImageProcessorPil:
    """CLIP's settings (old feature-extractor style `size: 336` or the new dicts) + LLaVA's padding."""
    size, crop = preprocessor.get("size", 336), preprocessor.get("crop_size", 336)
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    keys = ("image_mean", "image_std", "resample", "do_resize", "do_center_crop", "do_rescale", "rescale_factor",
            "do_normalize", "do_convert_rgb")
    kwargs = {k: preprocessor[k] for k in keys if k in preprocessor}
    return LlavaImageProcessorPil(size=size, crop_size=crop, do_pad=pad_to_square, **kwargs)


def build_processor(folder: Path, model_config, preprocessor: dict) -> LlavaProcessor:
    tokenizer = build_tokenizer(folder, model_config.image_token_index)
    image_processor = build_image_processor(preprocessor, getattr(model_config, "image_aspect_ratio", "pad") == "pad")
    vision = model_config.vision_config
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                          vision_feature_select_strategy=model_config.vision_feature_select_strategy,
                          chat_template=VICUNA_V1_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
