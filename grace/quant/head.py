"""An optional quantized lm_head: `grace.load(..., head="int8" | "int4")`.

The GRACE releases keep lm_head in bf16, and at decode it is the largest single read of a step
(151 936 x 2048 weights on Qwen3-VL-2B: 46 % of an INT4 step on CPU). Quantizing it round-to-nearest
(symmetric, per group of 128 inputs, as `quantize_` does for the decoder) makes decode faster but
changes the release's numerics, so it is off by default; bench/head_agreement.py measures how often
the quantized head picks the bf16 head's token.

Bytes, honestly: Qwen3-VL ties lm_head to the input embedding. The embedding is still needed for
input lookups and stays in bf16, so on a tied model a quantized head ADDS its bytes (int8: +0.5 B
per weight plus scales, int4: +0.27 B) instead of saving any; on an untied model it replaces the
bf16 head. `LoadedModel.weight_bytes` counts what is held either way.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantize import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_, replace_module

HEAD_KINDS = ("int8", "int4")


def head_group_size(in_features: int) -> int:
    for size in (128, 64, 32):
        if in_features % size == 0:
            return size
    raise ValueError(f"lm_head in_features={in_features} is not a multiple of 32; it cannot be quantized group-wise")


@torch.no_grad()
def quantize_head_(model: nn.Module, kind: str) -> dict:
    """Replace the model's output embedding (lm_head) by its round-to-nearest Int8Linear / Int4Linear,
    on the head's own device and dtype. Returns what was done, including whether a tied input
    embedding was kept (its bytes are then held twice: bf16 embedding + quantized head)."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head must be one of {HEAD_KINDS} (or None for the bf16 head), got {kind!r}")
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"'{name}' is a {type(head).__name__}, not a linear layer")
    weight = head.weight
    tied = weight is model.get_input_embeddings().weight
    group_size = head_group_size(head.in_features)
    config = (Int8WeightOnlyConfig if kind == "int8" else Int4WeightOnlyConfig)(group_size=group_size)
    holder = nn.Sequential(head)            # quantize_ exactly as it does decoder linears, on the head alone
    quantize_(holder, config)
    replace_module(model, name, holder[0])
    # the head is no longer the embedding's tensor: keep transformers from re-tying them (tie_weights)
    model_config = getattr(model, "config", None)
    for cfg in (model_config, getattr(model_config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return {"module": name, "kind": kind, "group_size": group_size, "tied_embedding_kept": tied}
