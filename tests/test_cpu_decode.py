"""grace/cpu_decode.py: the decode-step attention kernel against fp64 attention, its fallback to transformers'
sdpa, the switch on a model, and GrowingCache against DynamicCache."""

import threading

import pytest
import torch
from torch import nn
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from grace import chat, cpu_decode
from grace.quant import kernels
from grace.tiny import tiny_qwen3vl

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="grace's CPU kernels need x86-64 AVX-512 BF16 and cc")
needs_amx = pytest.mark.skipif(not kernels.amx(), reason="needs a CPU with AMX (and Linux granting it)")


def _attention_fp64(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, dim=1), v.double().repeat_interleave(group, dim=1)
    p = torch.softmax(q.double() @ k.transpose(-1, -2) * scale, dim=-1)
    return (p @ v).transpose(1, 2)                                  # [B, 1, Hq, D]


def _ulps(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|x - ref| in units of bf16's last place at ref."""
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    return (x.double() - ref).abs() / ulp


def _cache_view(b, h, length, d, spare=7):
    """Keys / values as a growing cache hands them out: views of a longer buffer."""
    return (torch.randn(b, h, length + spare, d) * 2).to(torch.bfloat16)[:, :, :length]


class _Attention(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


@needs_kernels
@pytest.mark.parametrize("b,hq,hkv,length,d", [(1, 16, 8, 265, 128), (2, 8, 8, 37, 64), (1, 14, 2, 1, 32),
                                                (1, 16, 1, 300, 256), (3, 4, 2, 17, 96)])
def test_attention_kernel_is_correctly_rounded_fp64_attention(b, hq, hkv, length, d):
    """Scores, softmax and the value sum are fp32 throughout: the bf16 output is the fp64 result rounded
    (at most one unit in the last place off, and only rarely)."""
    torch.manual_seed(length)
    q = torch.randn(b, hq, 1, d).to(torch.bfloat16)
    k, v = _cache_view(b, hkv, length, d), _cache_view(b, hkv, length, d)
    scale = d ** -0.5
    assert kernels.attention_decode_usable(q, k, v)
    out = kernels.attention_decode(q, k, v, scale)
    ref = _attention_fp64(q, k, v, scale)
    assert out.shape == (b, 1, hq, d) and out.dtype == torch.bfloat16
    ulps = _ulps(out, ref)
    assert ulps.max() <= 1.0 and (ulps > 0.5).double().mean() < 0.02
    torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True).transpose(1, 2)
    assert (out.double() - ref).abs().mean() <= (torch_out.double() - ref).abs().mean()


@needs_kernels
def test_attention_kernel_handles_peaked_and_flat_scores():
    """Huge scores (one key takes all the weight) and equal scores (a plain mean) stay finite and exact."""
    d = 64
    k = torch.randn(1, 2, 50, d).to(torch.bfloat16)
    v = torch.randn(1, 2, 50, d).to(torch.bfloat16)
    q = (k[:, :, 7:8] * 40).repeat_interleave(2, dim=1)                   # query heads 0,1 -> kv head 0, ...
    out = kernels.attention_decode(q, k, v, 1.0)
    assert torch.isfinite(out).all()
    ref = _attention_fp64(q, k, v, 1.0)
    assert _ulps(out, ref).max() <= 1.0
    flat = kernels.attention_decode(torch.zeros(1, 2, 1, d, dtype=torch.bfloat16), k, v, 1.0)
    assert _ulps(flat, v.double().mean(dim=2, keepdim=True).transpose(1, 2)).max() <= 1.0


@needs_kernels
def test_attention_kernel_is_safe_from_many_threads():
    q = torch.randn(2, 8, 1, 128).to(torch.bfloat16)
    k, v = _cache_view(2, 4, 200, 128), _cache_view(2, 4, 200, 128)
    expected = kernels.attention_decode(q, k, v, 0.1)
    results = [None] * 6

    def work(i):
        for _ in range(20):
            results[i] = kernels.attention_decode(q, k, v, 0.1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected) for r in results)


def test_usable_only_for_what_the_kernel_takes():
    q, k = torch.randn(1, 4, 1, 64).to(torch.bfloat16), torch.randn(1, 2, 9, 64).to(torch.bfloat16)
    assert not kernels.attention_decode_usable(q.float(), k.float(), k.float())        # fp32
    assert not kernels.attention_decode_usable(torch.randn(1, 4, 2, 64).to(torch.bfloat16), k, k)   # two query rows
    assert not kernels.attention_decode_usable(q[..., :48], k[..., :48], k[..., :48])  # head dim not a multiple of 32
    assert not kernels.attention_decode_usable(torch.randn(1, 3, 1, 64).to(torch.bfloat16), k, k)   # 3 heads over 2
    assert not kernels.attention_decode_usable(q, k[:, :, :0], k[:, :, :0])           # nothing cached
    assert not kernels.attention_decode_usable(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), k)
    with torch.enable_grad():
        assert not kernels.attention_decode_usable(q.requires_grad_(), k, k)


@pytest.mark.parametrize("case", ["prefill", "mask", "training"])
def test_everything_but_a_decode_step_is_transformers_sdpa(case):
    torch.manual_seed(0)
    module = _Attention(2)
    rows = 5 if case == "prefill" else 1
    q = torch.randn(1, 4, rows, 64).to(torch.bfloat16)
    k, v = torch.randn(1, 2, 9, 64).to(torch.bfloat16), torch.randn(1, 2, 9, 64).to(torch.bfloat16)
    mask = torch.ones(1, 1, rows, 9, dtype=torch.bool) if case == "mask" else None
    if case == "mask":
        mask[..., 3] = False
    module.train(case == "training")
    got, _ = cpu_decode.decode_attention(module, q, k, v, mask, scaling=0.125)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)
    assert torch.equal(got, want)


def _tiny(dtype=torch.bfloat16):
    model, processor = tiny_qwen3vl(seed=3, dtype=dtype)
    return model, processor


@needs_kernels
def test_use_cpu_decode_switches_the_language_model_only():
    model, _ = _tiny()
    assert cpu_decode.use_cpu_decode_(model)
    assert model.config.text_config._attn_implementation == cpu_decode.ATTENTION
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert not cpu_decode.use_cpu_decode_(model)                      # already done


def _greedy(model, ids, n, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.scores)


@needs_kernels
def test_a_model_on_the_decode_kernel_matches_transformers_sdpa():
    model, _ = _tiny()
    ids = torch.randint(5, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_tokens, ref_scores = _greedy(model, ids, 12)
        cpu_decode.use_cpu_decode_(model)
        tokens, scores = _greedy(model, ids, 12, **cpu_decode.cache_kwargs(model))
    assert torch.equal(tokens, ref_tokens)
    finite = torch.isfinite(ref_scores)                                # (min_new_tokens masks the end token)
    assert torch.equal(finite, torch.isfinite(scores))
    assert (scores - ref_scores)[finite].abs().max() < 0.05 * ref_scores[finite].abs().max()


@pytest.mark.parametrize("grow_by", [cpu_decode.GROW_BY, 3])
def test_growing_cache_gives_dynamic_cache_results_bit_for_bit(monkeypatch, grow_by):
    """The same tokens and scores, whether the buffers have room or reallocate every few steps."""
    monkeypatch.setattr(cpu_decode, "GROW_BY", grow_by)
    model, _ = _tiny(torch.float32)
    ids = torch.randint(5, 500, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref_tokens, ref_scores = _greedy(model, ids, 20, **{next(iter(cpu_decode.cache_kwargs(model))): DynamicCache()})
        cache = cpu_decode.cache_kwargs(model)
        tokens, scores = _greedy(model, ids, 20, **cache)
    assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)
    layer = next(iter(cache.values())).layers[0]
    assert isinstance(layer, cpu_decode.GrowingLayer) and layer.keys.shape[-2] == 9 + 19
    assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()       # a view, not a copy


def test_growing_cache_after_crop_and_reorder():
    """Cache code that crops (assisted decoding) or reorders (beam search) the keys keeps working: the next
    update lands after what is held, never after stale buffer contents."""
    layer = cpu_decode.GrowingLayer()
    first = torch.arange(2 * 1 * 6 * 4, dtype=torch.float32).reshape(2, 1, 6, 4)
    layer.update(first, first + 1000)
    layer.crop(-2)
    keys, values = layer.update(torch.full((2, 1, 1, 4), -1.0), torch.full((2, 1, 1, 4), -2.0))
    assert torch.equal(keys, torch.cat([first[:, :, :4], torch.full((2, 1, 1, 4), -1.0)], dim=2))
    assert torch.equal(values[:, :, :4], first[:, :, :4] + 1000)
    layer.batch_select_indices(torch.tensor([1]))
    keys, _ = layer.update(torch.full((1, 1, 1, 4), 7.0), torch.full((1, 1, 1, 4), 7.0))
    expected = torch.cat([first[1:, :, :4], torch.full((1, 1, 1, 4), -1.0), torch.full((1, 1, 1, 4), 7.0)], dim=2)
    assert torch.equal(keys, expected)


def test_beam_search_on_a_growing_cache_matches_dynamic_cache():
    model, _ = _tiny(torch.float32)
    ids = torch.randint(5, 500, (1, 7), generator=torch.Generator().manual_seed(4))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    key = next(iter(cpu_decode.cache_kwargs(model)))
    with torch.inference_mode():
        assert torch.equal(model.generate(**kw, **{key: DynamicCache()}), model.generate(**kw, **cpu_decode.cache_kwargs(model)))


def test_cache_bytes_counts_each_buffer_once_with_its_spare_room():
    layer = cpu_decode.GrowingLayer()
    layer.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8))
    cache = DynamicCache()
    cache.layers = [layer]
    held = 2 * (1 * 2 * (5 + cpu_decode.GROW_BY) * 8 * 4)
    assert chat.cache_bytes(cache) == held


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 1, 16, 128), (3, 200), (2, 5, 24)])
def test_rms_norm_kernel_matches_transformers_rms_norm(shape):
    """The same roundings as transformers' RMSNorm; only the fp32 sum's order differs (one bf16 unit, rarely)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

    torch.manual_seed(shape[-1])
    norm = Qwen3VLTextRMSNorm(shape[-1], eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]) * 0.5 + 1)
    x = (torch.randn(shape) * 3).to(torch.bfloat16)
    ref = norm(x)
    got = kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.shape == ref.shape and got.dtype == torch.bfloat16
    assert (got != ref).double().mean() < 0.002 and _ulps(got, ref.double()).max() <= 1.0


@needs_kernels
def test_fast_rms_norm_takes_a_decode_step_only():
    model, _ = _tiny()
    cpu_decode.use_cpu_decode_(model)
    norms = [m for m in model.modules() if isinstance(m, cpu_decode._FastRMSNorm)]
    assert len(norms) == 4 * 2 + 1                                      # 2 layers x (input, post, q, k) + final
    norm = norms[0]
    plain = type(norm).__mro__[2]
    x = torch.randn(1, 1, norm.weight.shape[0]).to(torch.bfloat16)
    assert torch.equal(norm(x), plain.forward(norm, x))
    big = torch.randn(1, kernels.RMS_NORM_MAX_ELEMENTS // x.shape[-1] + 1, x.shape[-1]).to(torch.bfloat16)
    assert torch.equal(norm(big), plain.forward(norm, big))             # torch's own path, unchanged
    assert torch.equal(norm(x.float()), plain.forward(norm, x.float()))


# -- the fused decode step of the attention modules ----------------------------------------------------------

def _rope_inputs(b, hq, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, 1, hq * d, generator=g) * 2).to(torch.bfloat16)
    k = (torch.randn(b, 1, hkv * d, generator=g) * 2).to(torch.bfloat16)
    angle = torch.rand(b, 1, d // 2, generator=g) * 300
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(torch.bfloat16), torch.cat([angle.sin()] * 2, -1).to(torch.bfloat16)
    return q, k, cos, sin


def _torch_rope(q, k, cos, sin, d):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    b = q.shape[0]
    q, k = apply_rotary_pos_emb(q.view(b, 1, -1, d).transpose(1, 2), k.view(b, 1, -1, d).transpose(1, 2), cos, sin)
    return q.transpose(1, 2).reshape(b, 1, -1), k.transpose(1, 2).reshape(b, 1, -1)


@needs_kernels
@pytest.mark.parametrize("b,hq,hkv,d", [(1, 16, 8, 128), (2, 8, 2, 64), (1, 4, 4, 256), (3, 6, 3, 32)])
def test_qk_rope_kernel_is_transformers_rotary_bit_for_bit(b, hq, hkv, d):
    q, k, cos, sin = _rope_inputs(b, hq, hkv, d, seed=d + b)
    assert kernels.qk_norm_rope_usable(q, k, None, None, cos, sin, d)
    got_q, got_k = kernels.qk_norm_rope(q, k, None, None, cos, sin, d)
    want_q, want_k = _torch_rope(q, k, cos, sin, d)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@needs_kernels
def test_qk_norm_rope_kernel_matches_the_head_norms_then_the_rotary():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

    b, hq, hkv, d = 2, 16, 8, 128
    q, k, cos, sin = _rope_inputs(b, hq, hkv, d, seed=5)
    norms = [Qwen3VLTextRMSNorm(d, eps=1e-6).to(torch.bfloat16) for _ in range(2)]
    with torch.no_grad():
        for i, n in enumerate(norms):
            n.weight.copy_(torch.randn(d, generator=torch.Generator().manual_seed(i)) * 0.3 + 1)
    want_q, want_k = _torch_rope(norms[0](q.view(b, 1, hq, d)).reshape(b, 1, -1),
                                 norms[1](k.view(b, 1, hkv, d)).reshape(b, 1, -1), cos, sin, d)
    spec = [(n.weight, n.variance_epsilon) for n in norms]
    got_q, got_k = kernels.qk_norm_rope(q, k, spec[0], spec[1], cos, sin, d)
    for got, want in ((got_q, want_q), (got_k, want_k)):          # the norm's fp32 sum order: one unit, rarely
        assert (got != want).double().mean() < 0.005 and _ulps(got, want.double()).max() <= 2.0
    # the input stays as it was: the kernel writes new tensors
    assert torch.equal(q, _rope_inputs(b, hq, hkv, d, seed=5)[0])


def test_qk_norm_rope_usable_only_for_what_the_kernel_takes():
    q, k, cos, sin = _rope_inputs(1, 4, 2, 64, seed=0)
    assert not kernels.qk_norm_rope_usable(q.float(), k, None, None, cos, sin, 64)
    assert not kernels.qk_norm_rope_usable(q, k, None, None, cos[..., :32], sin[..., :32], 64)
    assert not kernels.qk_norm_rope_usable(torch.cat([q, q], 1), k, None, None, cos, sin, 64)     # two positions
    assert not kernels.qk_norm_rope_usable(q, k, (torch.ones(32, dtype=torch.bfloat16), 1e-6), None, cos, sin, 64)
    wide = torch.randn(1, 1, 4 * 512).to(torch.bfloat16)
    assert not kernels.qk_norm_rope_usable(wide, wide, None, None, *[torch.ones(1, 1, 512, dtype=torch.bfloat16)] * 2, 512)


def _plain_attention_(model):
    for m in model.modules():
        if isinstance(m, cpu_decode._FastDecodeAttention):
            m.__class__ = type(m).__mro__[2]


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@needs_kernels
@pytest.mark.parametrize("which", ["qwen3vl", "llama", "qwen3vl-batch2"])
def test_fused_decode_attention_gives_the_module_path_bit_for_bit(monkeypatch, which):
    """The fused step (projections, one norm-and-rotary kernel, cache, attention kernel, o_proj) against the
    same model with transformers' attention forward on grace's attention function: the same tokens and scores."""
    model = _tiny_llama() if which == "llama" else _tiny()[0]
    cpu_decode.use_cpu_decode_(model)
    fused = [m for m in model.modules() if isinstance(m, cpu_decode._FastDecodeAttention)]
    assert len(fused) == 2
    calls = _count_calls(monkeypatch, "qk_norm_rope")
    batch = 2 if which.endswith("batch2") else 1                       # equal lengths: no mask, the fused step
    ids = torch.randint(5, 250, (batch, 33), generator=torch.Generator().manual_seed(7))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
              do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.inference_mode():
        out = model.generate(**kw, **cpu_decode.cache_kwargs(model))
        assert len(calls) == 9 * 2                                     # every decode step, every layer
        _plain_attention_(model)
        ref = model.generate(**kw, **cpu_decode.cache_kwargs(model))
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(torch.stack(out.scores), torch.stack(ref.scores))


@needs_kernels
def test_fused_decode_attention_torch_fallback_for_odd_projections(monkeypatch):
    model, _ = _tiny()
    cpu_decode.use_cpu_decode_(model)
    ids = torch.randint(5, 250, (1, 20), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        tokens, scores = _greedy(model, ids, 6, **cpu_decode.cache_kwargs(model))
        monkeypatch.setattr(kernels, "qk_norm_rope_usable", lambda *a: False)
        torch_tokens, torch_scores = _greedy(model, ids, 6, **cpu_decode.cache_kwargs(model))
    assert torch.equal(tokens, torch_tokens) and torch.equal(scores, torch_scores)


@needs_kernels
@pytest.mark.parametrize("case", ["padding", "grad", "sdpa", "fp32", "norm_hook"])
def test_fused_decode_attention_leaves_other_cases_to_transformers(monkeypatch, case):
    model, _ = _tiny(torch.float32 if case == "fp32" else torch.bfloat16)
    cpu_decode.use_cpu_decode_(model)
    if case == "sdpa":                                                 # an operator's own attention choice
        model.config.text_config._attn_implementation = "sdpa"
    seen = []
    if case == "norm_hook":                                            # the fused kernel would skip it
        for m in model.modules():
            if isinstance(m, cpu_decode._FastDecodeAttention):
                m.q_norm.register_forward_hook(lambda *a: seen.append(1))
    calls = _count_calls(monkeypatch, "qk_norm_rope")
    ids = torch.randint(5, 250, (2, 12), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    if case == "padding":
        mask[1, :4] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
              **cpu_decode.cache_kwargs(model))
    if case == "grad":
        with torch.enable_grad():
            out = model(input_ids=ids[:, :1], attention_mask=mask[:, :1], use_cache=True, **cpu_decode.cache_kwargs(model))
        assert out.logits.requires_grad
    else:
        with torch.inference_mode():
            model.generate(**kw)
    assert calls == []
    if case == "norm_hook":
        assert len(seen) == 2 * 4                                      # both layers, prefill and 3 decode steps


# -- several projections of one input in one kernel call ------------------------------------------------------

def _projections(kind, shapes, seed=0):
    import grace
    from grace.quant.bf16 import fast_bf16_linears_

    torch.manual_seed(seed)
    holder = nn.Sequential(*[nn.Linear(k, n, bias=False, dtype=torch.bfloat16) for k, n in shapes])
    if kind == "bf16":
        fast_bf16_linears_(holder)
    else:
        from grace.quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        grace.quantize_(holder, Int4WeightOnlyConfig(symmetric=False) if kind == "int4" else Int8WeightOnlyConfig())
    return tuple(holder)


@needs_kernels
@pytest.mark.parametrize("kind,rows", [("int4", 1), ("int4", 3), ("int4", "most"), ("int8", 1), ("int8", 2),
                                       ("int8", "most"), ("bf16", 1)])
@pytest.mark.parametrize("limits", ["avx512", pytest.param("amx", marks=needs_amx)])   # the GEMVs' row limits
def test_project_many_is_each_projection_bit_for_bit(monkeypatch, kind, rows, limits):
    monkeypatch.setattr(kernels, "_AMX", limits == "amx")
    rows = kernels.gemv_max_rows(kind) if rows == "most" else rows
    mods = _projections(kind, [(1024, 1024), (1024, 1024 + 256), (1024, 2048)])
    x = torch.randn(1, rows, 1024).to(torch.bfloat16)
    calls = _count_calls(monkeypatch, "gemv_many")
    with torch.inference_mode():
        got = cpu_decode.project_many(mods, x)
        want = [m(x) for m in mods]
    assert calls == [1]                                                   # one call for all three
    assert all(g.shape == w.shape and torch.equal(g, w) for g, w in zip(got, want))


@needs_kernels
@pytest.mark.parametrize("case", ["mixed", "hook", "rows", "grad", "group"])
def test_project_many_falls_back_to_the_modules(monkeypatch, case):
    mods = list(_projections("int4", [(1024, 1024), (1024, 1024)]))
    x = torch.randn(1, 1, 1024).to(torch.bfloat16)
    if case == "mixed":
        mods[1] = _projections("int8", [(1024, 1024)])[0]
    if case == "hook":
        seen = []
        mods[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    if case == "rows":
        x = torch.randn(1, kernels.gemv_max_rows("int4") + 1, 1024).to(torch.bfloat16)
    if case == "grad":                                                     # autograd needs the modules' own path
        x.requires_grad_(True)
    if case == "group":
        import grace
        from grace.quant import Int4WeightOnlyConfig

        holder = nn.Sequential(nn.Linear(1024, 1024, bias=False, dtype=torch.bfloat16))
        grace.quantize_(holder, Int4WeightOnlyConfig(group_size=256))
        mods[1] = holder[0]
    calls = _count_calls(monkeypatch, "gemv_many")
    context = torch.enable_grad() if case == "grad" else torch.inference_mode()
    with context:
        got = cpu_decode.project_many(tuple(mods), x)
        want = [m(x) for m in mods]
    assert calls == []
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    if case == "hook":
        assert len(seen) == 2                                              # the hook ran for both forwards


@needs_kernels
def test_use_cpu_decode_swaps_the_text_mlps():
    model, _ = _tiny()
    cpu_decode.use_cpu_decode_(model)
    mlps = [m for m in model.modules() if isinstance(m, cpu_decode._FastMLP)]
    assert len(mlps) == 2 and all(isinstance(m, cpu_decode.FastQwen3VLTextMLP) for m in mlps)


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "int4"])
@pytest.mark.parametrize("rows", [1, 9, 17])
def test_fused_mlp_is_transformers_mlp_bit_for_bit(monkeypatch, kind, rows):
    """Large enough for grace's kernels: gate and up in one call for a decode row (INT4: up to the GEMV's row
    limit, 16 rows, 4 on AMX), the modules' own path for more."""
    import grace
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextMLP
    from grace.quant import Int4WeightOnlyConfig
    from grace.quant.bf16 import fast_bf16_linears_

    torch.manual_seed(0)
    mlp = Qwen3VLTextMLP(Qwen3VLTextConfig(hidden_size=1024, intermediate_size=1024, hidden_act="silu")).to(torch.bfloat16)
    if kind == "bf16":
        fast_bf16_linears_(mlp)
    else:
        grace.quantize_(mlp, Int4WeightOnlyConfig(symmetric=False), filter_fn=lambda m, name: isinstance(m, nn.Linear))
    x = torch.randn(1, rows, 1024).to(torch.bfloat16)
    with torch.inference_mode():
        want = mlp(x)
        mlp.__class__ = cpu_decode.FastQwen3VLTextMLP
        calls = _count_calls(monkeypatch, "gemv_many")
        got = mlp(x)
    fused = rows == 1 or (kind == "int4" and rows <= kernels.gemv_max_rows("int4"))
    assert calls == ([1] if fused else []) and torch.equal(got, want)


def test_gemv_many_refuses_what_the_kernels_cannot_take():
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    w = torch.zeros(16, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        kernels.gemv_many("bf16", x, [(w, None, 16)])                 # bf16: one row only
    with pytest.raises(ValueError):
        kernels.gemv_many("bf16", x[:1], [(w[:12], None, 12)])        # whole 8-row tiles only
    with pytest.raises(ValueError):
        kernels.gemv_many("bf16", x[:1], [(w, None, 16)] * (kernels.MANY_MAX + 1))
