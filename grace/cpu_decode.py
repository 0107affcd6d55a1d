"""A CPU decode step beyond its linears: attention for the one new token, RMSNorm, and a KV cache that grows
in place.

Once the linears read their weights near the memory wall (quant/kernels.py), the rest of a decode step is
what is left, and these parts of it together cost as much as a quantized model's decoder weights:

- transformers' "sdpa" attention hands a grouped-query decode step (Qwen3-VL: 16 query heads over 8
  key/value heads) to torch with `enable_gqa=True`, which on the CPU runs ~0.5 ms per layer for a
  265-token cache: 16 ms of a 2B step. `decode_attention` (registered as the attention implementation
  "grace_sdpa") runs such a step on grace's attention kernel, which reads each cached key and value once
  (~40 us), and hands every other case (prefill, masks, training, GPUs) to transformers' own sdpa, unchanged.
- RMSNorm (four a layer in Qwen3-VL: before attention and the MLP, on the queries and the keys) is seven
  small torch ops, ~15 us, for one row; `rms_norm` in the kernels does it in one call, with the same roundings.
- Between its projections and the cache, the attention module of a decode step runs the query and key heads'
  norms and the rotary embedding (seven ops for each of q and k) and an attention-function dispatch; the
  `FAST_ATTENTIONS` classes take such a step in one kernel for norms and rotary (the norms as `rms_norm`, the
  rotary bit for bit), the cache update and the attention kernel: ~1.5-4 ms of a 2B step saved. Their q / k / v
  projections, and the MLPs' gate / up (`FAST_MLPS`), go to the kernels as one call each (`project_many`).
- `DynamicCache` concatenates each layer's keys and values with the new token's at every step, copying
  the whole cache (two per layer, 56 per 2B step). `GrowingCache` keeps them in buffers with spare room
  and writes the new token in place; what it returns are views of the filled part, the same values.

`use_cpu_decode_(model)` switches a loaded model's text attention modules, MLPs, attention function and
RMSNorms over; `cache_kwargs(model)` is what the generate calls in grace pass for the cache. Both are plain
per-model state: nothing process-wide is flipped, so threads serving several models at once do not meet.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm
from transformers.models.qwen3_vl import modeling_qwen3_vl
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextAttention, Qwen3VLTextMLP, Qwen3VLTextRMSNorm

from .quant import kernels

ATTENTION = "grace_sdpa"
# spare positions a growing buffer gets beyond what it holds (then it doubles): a typical answer never
# reallocates after the prompt
GROW_BY = 256


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature. One query position and no mask (a decode step attends to
    every cached position) goes to grace's kernel; anything else to transformers' sdpa."""
    if (attention_mask is None and not module.training and kwargs.get("position_bias") is None
            and kwargs.get("s_aux") is None and kwargs.get("softcap") is None
            and kernels.attention_decode_usable(query, key, value)):
        scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
        return kernels.attention_decode(query, key, value, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(ATTENTION, decode_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)     # the masks sdpa gets, so the fallback sees the same


class _FastRMSNorm:
    """transformers' Llama / Qwen3 RMSNorm, with a decode step's few bf16 rows on grace's kernel."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x, w = hidden_states, self._parameters["weight"]
        if (x.dtype is torch.bfloat16 and w.dtype is torch.bfloat16 and x.shape[-1] == w.shape[0]
                and x.numel() <= kernels.RMS_NORM_MAX_ELEMENTS and x.device.type == "cpu" and w.device.type == "cpu"
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)) and kernels.available()):
            return kernels.rms_norm(x, w, self.variance_epsilon)
        return super().forward(x)


class FastQwen3VLTextRMSNorm(_FastRMSNorm, Qwen3VLTextRMSNorm):
    pass


class FastLlamaRMSNorm(_FastRMSNorm, LlamaRMSNorm):
    pass


FAST_RMS_NORMS = {Qwen3VLTextRMSNorm: FastQwen3VLTextRMSNorm, LlamaRMSNorm: FastLlamaRMSNorm}


def _hooked(module: nn.Module) -> bool:
    """Whether calling past `module.forward` would skip something: torch hooks, or a forward replaced on the
    instance (accelerate's hooks do that)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks or "forward" in module.__dict__
                or hasattr(module, "_hf_hook"))


def project_many(modules: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """[m(x) for m in modules], in one kernel call where each of them would be one GEMV of the same kind (a
    decode step's q / k / v or gate / up projections): x is read once and the call, its thread start and its
    Python paid once instead of two or three times. The same tiles, so the same bits; anything else (another
    kind, hooks on a module, a path that is not a GEMV) is the modules' own forward."""
    specs = []
    for m in modules:
        spec = m.decode_gemv(x) if hasattr(m, "decode_gemv") and not _hooked(m) else None
        if spec is None or (specs and spec[0] != specs[0][0]) or (specs and spec[4] != specs[0][4]):
            return [m(x) for m in modules]
        specs.append(spec)
    if len(specs) < 2 or len(specs) > kernels.MANY_MAX:
        return [m(x) for m in modules]
    return kernels.gemv_many(specs[0][0], x, [(codes, params, n) for _, codes, params, n, _ in specs], specs[0][4])


def _norm_of(module: nn.Module | None) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a Llama / Qwen3 RMSNorm, None for no module; anything else is not ours to fuse."""
    if module is None:
        return None
    if type(module) not in FAST_RMS_NORMS.values() or _hooked(module):     # the kernel is what these run
        raise LookupError
    return module._parameters["weight"], module.variance_epsilon


class _FastDecodeAttention:
    """transformers' Llama / Qwen3-VL text attention, with a CPU decode step in four kernel calls after the
    projections: the query and key heads' RMSNorm and rotary embedding in one (seven small torch ops a head
    set, ~60 us a layer), the cache update, the attention kernel and o_proj. It takes the step only where the
    model's attention is grace's ("grace_sdpa"), one position with no mask, no autograd, bf16 on the CPU, and
    a DynamicCache (or GrowingCache); everything else is transformers' forward, unchanged."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if (attention_mask is None and position_embeddings is not None and isinstance(cache, DynamicCache)
                and not self.training and not torch.is_grad_enabled() and hidden_states.dim() == 3
                and hidden_states.shape[1] == 1 and hidden_states.dtype is torch.bfloat16
                and hidden_states.device.type == "cpu" and self.config._attn_implementation == ATTENTION):
            out = self._decode_step(hidden_states, *position_embeddings, cache)
            if out is not None:
                return out, None
        return super().forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)

    def _decode_step(self, hidden_states, cos, sin, cache) -> torch.Tensor | None:
        try:
            q_norm, k_norm = _norm_of(getattr(self, "q_norm", None)), _norm_of(getattr(self, "k_norm", None))
        except LookupError:
            return None
        d, b = self.head_dim, hidden_states.shape[0]
        q, k, v = project_many((self.q_proj, self.k_proj, self.v_proj), hidden_states)
        if kernels.qk_norm_rope_usable(q, k, q_norm, k_norm, cos, sin, d):
            q, k = kernels.qk_norm_rope(q, k, q_norm, k_norm, cos, sin, d)
        else:          # an odd projection output (another dtype, a strided view): the model's own ops
            q, k = self._norm_rope_torch(q, k, cos, sin)
        keys, values = cache.update(k.view(b, 1, -1, d).transpose(1, 2), v.view(b, 1, -1, d).transpose(1, 2), self.layer_idx)
        out, _ = decode_attention(self, q.view(b, 1, -1, d).transpose(1, 2), keys, values, None, scaling=self.scaling)
        return self.o_proj(out.reshape(b, 1, -1))

    def _norm_rope_torch(self, q, k, cos, sin):
        """What transformers' forward does between the projections and the cache, on [B, 1, H * D] rows."""
        b, d = q.shape[0], self.head_dim
        q, k = q.reshape(b, 1, -1, d), k.reshape(b, 1, -1, d)
        if getattr(self, "q_norm", None) is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q.reshape(b, 1, -1), k.reshape(b, 1, -1)


class FastQwen3VLTextAttention(_FastDecodeAttention, Qwen3VLTextAttention):
    _apply_rotary = staticmethod(modeling_qwen3_vl.apply_rotary_pos_emb)


class FastLlamaAttention(_FastDecodeAttention, LlamaAttention):
    _apply_rotary = staticmethod(modeling_llama.apply_rotary_pos_emb)


FAST_ATTENTIONS = {Qwen3VLTextAttention: FastQwen3VLTextAttention, LlamaAttention: FastLlamaAttention}


class _FastMLP:
    """transformers' Llama / Qwen3-VL text MLP, down(act(gate(x)) * up(x)), with gate and up as one call where
    `project_many` can (a decode step); the same ops otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project_many((self.gate_proj, self.up_proj), x)
        return self.down_proj(self.act_fn(gate) * up)


class FastQwen3VLTextMLP(_FastMLP, Qwen3VLTextMLP):
    pass


class FastLlamaMLP(_FastMLP, LlamaMLP):
    pass


FAST_MLPS = {Qwen3VLTextMLP: FastQwen3VLTextMLP, LlamaMLP: FastLlamaMLP}
# every class `use_cpu_decode_` swaps, transformers' -> grace's
FAST_CLASSES = {**FAST_RMS_NORMS, **FAST_ATTENTIONS, **FAST_MLPS}


def use_cpu_decode_(model: nn.Module) -> bool:
    """Route the causal (language-model) attention of `model` through `decode_attention` where it uses
    sdpa, and its Llama / Qwen3-VL text attention modules, MLPs and RMSNorms through `FAST_CLASSES` (the class
    changes; parameters and hooks stay); a vision tower keeps its own. Returns whether anything changed; a
    no-op where grace's kernels cannot run."""
    if not kernels.available():
        return False
    changed = False
    for module in model.modules():
        fast = FAST_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
            changed = True
    configs = {id(m.config): m.config for m in model.modules()
               if getattr(m, "is_causal", False) and hasattr(m, "num_key_value_groups") and hasattr(m, "config")}
    for config in configs.values():
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = ATTENTION
            changed = True
    return changed


def _holds(buffer: torch.Tensor | None, held: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether `held` is the filled front of `buffer`, with room after it for `new`."""
    if buffer is None or buffer.dtype != new.dtype or buffer.device != new.device:
        return False
    if buffer.shape[:-2] != new.shape[:-2] or buffer.shape[-1] != new.shape[-1]:
        return False
    filled = held.shape[-2] if held.dim() == 4 else 0
    if filled and (held.data_ptr() != buffer.data_ptr() or held.stride() != buffer.stride()
                   or held.shape[:-2] != buffer.shape[:-2]):
        return False
    return filled + new.shape[-2] <= buffer.shape[-2]


def _append(buffer: torch.Tensor | None, held: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, held ++ new along positions as a view of buffer), reallocating when there is no room or
    `held` is not the buffer's front any more (cropped, reordered or replaced by other cache code)."""
    filled = held.shape[-2] if held.dim() == 4 else 0
    need = filled + new.shape[-2]
    if not _holds(buffer, held, new):
        capacity = max(need + GROW_BY, 2 * filled)
        buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
        if filled:
            buffer[..., :filled, :].copy_(held)
    buffer[..., filled:need, :].copy_(new)
    return buffer, buffer[..., :need, :]


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with spare room (see the module doc)."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._key_buffer, self.keys = _append(self._key_buffer, self.keys, key_states)
        self._value_buffer, self.values = _append(self._value_buffer, self.values, value_states)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class GrowingCache(DynamicCache):
    """DynamicCache with GrowingLayer in place of every DynamicLayer (sliding-window layers stay as they are)."""

    def __init__(self, config=None):
        super().__init__(config=config)
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = GrowingLayer
        for layer in self.layers:
            if type(layer) is DynamicLayer:
                layer.__class__ = GrowingLayer


def new_cache(model: nn.Module) -> GrowingCache:
    """A fresh cache for one generate call of `model`."""
    return GrowingCache(config=getattr(model, "config", None))


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model: nn.Module) -> dict:
    """{keyword: new_cache(model)} for `model.generate`: transformers 5 renamed `past_key_values` to `cache`
    (the old name warns); the model's forward says which one this version takes."""
    return {_cache_keyword(type(model)): new_cache(model)}
