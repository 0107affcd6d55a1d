"""Tensor names: the original LLaVA codebase's (`LlavaLlamaForCausalLM`) <-> transformers 5's
`LlavaForConditionalGeneration`.

The same steps as transformers' `convert_llava_weights_to_hf.py`, followed by transformers 5's own
renaming: the language model under `model.language_model`, the projector's `mm_projector.0/.2` as
`multi_modal_projector.linear_1/linear_2`, the vision tower under `model.vision_tower` with no
`vision_model.` level, and `lm_head` at the top.
"""

from __future__ import annotations

# (original prefix, transformers prefix), tried in order; the first match wins.
ORIGINAL_TO_HF = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
# llava-hf checkpoints as saved (`language_model.model.*`, `vision_tower.vision_model.*` by transformers 4,
# `vision_tower.*` by transformers 5's save_pretrained, which writes the legacy names back).
LLAVA_HF_V4_TO_HF = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
VISION_TOWER_COPY = "model.vision_tower.vision_tower."     # the tower the original loader never reads
CLIP_VISION_PREFIX = "vision_model."                       # in a CLIPModel / CLIPVisionModel checkpoint


def _rename(name: str, table) -> str | None:
    for old, new in table:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def to_hf(name: str) -> str | None:
    """Original LLaVA tensor / module name -> transformers name (None: not a LLaVA name)."""
    return _rename(name, ORIGINAL_TO_HF)


def to_original(name: str) -> str | None:
    """transformers name -> original LLaVA name (the inverse of `to_hf`)."""
    return _rename(name, tuple((new, old) for old, new in ORIGINAL_TO_HF))


def llava_hf_to_hf(name: str) -> str:
    """A llava-hf checkpoint name, in either transformers generation's naming -> transformers 5's."""
    if name.startswith(("model.", "lm_head.")):
        return name
    return _rename(name, LLAVA_HF_V4_TO_HF) or name


# a CLIPVisionModel saved by transformers 5 has no `vision_model.` level
CLIP_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def vision_tower_to_hf(name: str) -> str | None:
    """A CLIP checkpoint's vision tensor (`vision_model.*`, or bare in a CLIPVisionModel saved by transformers 5)
    -> the LLaVA model's name (None: not part of the vision tower, e.g. the text tower or the projections)."""
    if name.startswith(CLIP_VISION_PREFIX):
        return "model.vision_tower." + name[len(CLIP_VISION_PREFIX):]
    if name.startswith(CLIP_VISION_PARTS):
        return "model.vision_tower." + name
    return None


def hf_to_llava_hf_v4(name: str) -> str:
    """transformers 5 name -> the llava-hf hub naming (transformers 4), which every serving engine reads."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name
