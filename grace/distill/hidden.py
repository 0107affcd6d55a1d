"""Which hidden states R-CKA aligns, and capturing one decoder layer's output cheaply.

In transformers' Qwen3-VL text model, `output_hidden_states=True` gives N + 1 tensors for N
decoder layers: [0] the input embeddings, [k] the output of decoder layer k (1-based) for
k < N, and [N] the final output *after* the last RMSNorm (transformers replaces the last
layer's raw output with `last_hidden_state`). The penultimate decoder layer's output is
therefore `hidden_states[-2]` (= [N - 1]), un-normalised.

Deepstack caveat: Qwen3-VL adds visual features to the output of its first few decoder layers
(`vision_config.deepstack_visual_indexes`, 3 of 28 layers in the 2B model) *after* the layer
returns, so hidden_states / the hook below see those layers' outputs without the deepstack
addition. The penultimate layer of any real model is far past them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

_DECODER_LAYER_PATHS = ("model.language_model.layers", "language_model.layers", "model.layers", "layers")


def penultimate_hidden(outputs) -> torch.Tensor:
    """The penultimate decoder layer's output [B, L, D] from a forward run with output_hidden_states=True."""
    hidden_states = getattr(outputs, "hidden_states", None)
    if not hidden_states or len(hidden_states) < 3:
        raise ValueError("outputs carry no hidden states for two or more decoder layers; "
                         "run the model with output_hidden_states=True")
    return hidden_states[-2]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of a Qwen3-VL (conditional generation, base or text) model."""
    for path in _DECODER_LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__} has no decoder layers at any of {', '.join(_DECODER_LAYER_PATHS)}")


@dataclass
class LayerCapture:
    """Filled by `capture_layer_output`: the layer's output of the latest forward pass."""

    layer_index: int
    output: torch.Tensor | None = None


@contextmanager
def capture_layer_output(model: nn.Module, layer_index: int = -2):
    """Record one decoder layer's output during forward passes, without output_hidden_states.

        with capture_layer_output(student, -2) as captured:
            logits = student(**batch).logits
        hidden = captured.output          # [B, L, D], in the autograd graph

    layer_index counts decoder layers from 0 (negative from the end: -2 is the penultimate
    layer, the same tensor as `penultimate_hidden`). Only that tensor is kept; the hook is
    removed on exit.
    """
    layers = decoder_layers(model)
    capture = LayerCapture(layer_index)

    def keep(_module, _args, output):
        capture.output = output[0] if isinstance(output, (tuple, list)) else output

    handle = layers[layer_index].register_forward_hook(keep)
    try:
        yield capture
    finally:
        handle.remove()
