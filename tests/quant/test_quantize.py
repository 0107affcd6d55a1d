"""quantize_: the one targeting rule (whole name components), filter_fn, handlers per config type."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from grace.distill import QATConfig, apply_qat, qat_target_names
from grace.quant import (Int4Linear, Int4WeightOnlyConfig, Int8Linear, Int8WeightOnlyConfig, name_matches, quantize_,
                         register_handler, target_linears)
from grace.quant import primitives as P

LANGUAGE_LEAVES = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.fixture
def tiny():
    from grace.tiny import tiny_qwen3vl

    return tiny_qwen3vl(0)[0]


@pytest.mark.parametrize("name,patterns,expected", [
    ("model.visual.blocks.0.attn.qkv", ["visual"], True),
    ("model.visual.merger.linear_fc1", ["merger"], True),
    ("model.visual.deepstack_merger_list.0.linear_fc1", ["merger"], False),   # a component, not a substring
    ("model.revisual.x", ["visual"], False),
    ("model.language_model.layers.0.mlp.up_proj", ["mlp.up_proj"], True),     # dotted runs match whole
    ("model.language_model.layers.0.mlp.up_proj", ["layers.mlp"], False),
    ("lm_head", ["lm_head", "visual"], True),
    ("lm_head", [], False),
])
def test_name_matches_whole_components(name, patterns, expected):
    assert name_matches(name, patterns) is expected


def test_default_targets_are_the_language_models_decoder_linears(tiny):
    names = target_linears(tiny)
    layers = tiny.config.text_config.num_hidden_layers
    assert sorted(names) == sorted(f"model.language_model.layers.{i}.{leaf}" for i in range(layers)
                                   for leaf in LANGUAGE_LEAVES)
    assert qat_target_names(tiny, QATConfig(bits=4)) == names     # QAT follows the same rule
    assert quantize_(tiny, Int8WeightOnlyConfig()) == names


def test_skip_keywords_are_components_too(tiny):
    names = target_linears(tiny, skip=("visual", "lm_head", "embed_tokens", "mlp"))
    assert names and all(n.rsplit(".", 2)[-2] == "self_attn" for n in names)
    with_merger = target_linears(tiny, skip=("lm_head", "blocks"))     # keep visual mergers, drop visual blocks
    assert "model.visual.merger.linear_fc1" in with_merger and not any(".blocks." in n for n in with_merger)


def test_filter_fn_decides_instead_of_the_skip_rule(tiny):
    seen = []

    def only_q_proj(module, name):
        seen.append(type(module))
        return name.endswith("q_proj")

    names = quantize_(tiny, Int4WeightOnlyConfig(), filter_fn=only_q_proj)
    assert names and all(n.endswith("q_proj") for n in names)
    assert set(seen) == {nn.Linear}                                 # only linears are offered
    quantized = [n for n, m in tiny.named_modules() if isinstance(m, Int4Linear)]
    assert sorted(quantized) == sorted(names)
    assert isinstance(tiny.model.language_model.layers[0].mlp.up_proj, nn.Linear)


def test_bad_group_size_changes_nothing(tiny):
    before = [n for n, m in tiny.named_modules() if isinstance(m, nn.Linear)]
    with pytest.raises(ValueError, match="group_size=256"):
        quantize_(tiny, Int4WeightOnlyConfig(group_size=256))      # hidden 128: no linear divides
    assert [n for n, m in tiny.named_modules() if isinstance(m, nn.Linear)] == before


def test_unknown_config_type_is_refused():
    @dataclass(frozen=True)
    class Unregistered:
        group_size: int = 128
        skip_keywords: tuple = ()

    with pytest.raises(TypeError, match="Unregistered.*Int4WeightOnlyConfig"):
        quantize_(nn.Sequential(nn.Linear(128, 8)), Unregistered())


def test_a_registered_handler_is_what_quantize_runs():
    @dataclass(frozen=True)
    class HalfConfig:                     # a made-up "quantization": keep the linear, halve its weight
        group_size: int = 1
        skip_keywords: tuple = ("skipme",)

    @register_handler(HalfConfig)
    def halve(linear, config):
        new = nn.Linear(linear.in_features, linear.out_features, bias=False)
        new.weight.data = linear.weight.data / 2
        return new

    model = nn.Sequential()
    model.add_module("keep", nn.Linear(4, 4, bias=False))
    model.add_module("skipme", nn.Linear(4, 4, bias=False))
    weights = [m.weight.detach().clone() for m in model]
    assert quantize_(model, HalfConfig()) == ["keep"]
    assert torch.equal(model.keep.weight, weights[0] / 2) and torch.equal(model.skipme.weight, weights[1])


@pytest.mark.parametrize("config,cls", [(Int4WeightOnlyConfig(), Int4Linear), (Int8WeightOnlyConfig(), Int8Linear),
                                        (Int4WeightOnlyConfig(symmetric=False), Int4Linear)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modules_hold_the_primitives_codes_bias_and_dtype(config, cls, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 32, dtype=dtype))
    weight, bias = model[0].weight.detach().float().clone(), model[0].bias.detach().clone()
    quantize_(model, config)
    module = model[0]
    assert type(module) is cls and module.bias.dtype == dtype and torch.equal(module.bias, bias)
    if config.bits == 8:
        codes, scales = P.quantize_symmetric(weight, 8, 128)
        expected = P.dequantize(codes, scales, 128)
    elif config.symmetric:
        codes, scales = P.quantize_symmetric(weight, 4, 128, scale_dtype=torch.float16)
        expected = P.dequantize(codes, scales, 128)
        assert torch.equal(module.codes(), P.signed_to_unsigned(codes, 4))
    else:
        codes, scales, zeros = P.quantize_asymmetric(weight, 4, 128, scale_dtype=torch.float16)
        expected = P.dequantize(codes, scales, 128, zeros)
        assert torch.equal(module.codes(), codes) and not (zeros == 8).all()
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7 * expected.abs().max().item()   # bf16-held scales
    torch.testing.assert_close(module.dequantize().float(), expected, rtol=0, atol=tol)


def test_asymmetric_int4_fits_one_sided_weights_better():
    torch.manual_seed(1)
    errors = {}
    for symmetric in (True, False):
        model = nn.Sequential(nn.Linear(256, 64, bias=False))
        model[0].weight.data = torch.rand(64, 256) * 0.05             # all positive
        weight = model[0].weight.detach().clone()
        quantize_(model, Int4WeightOnlyConfig(symmetric=symmetric))
        errors[symmetric] = (model[0].dequantize() - weight).abs().mean().item()
    assert errors[False] < 0.6 * errors[True]


def test_quantize_on_the_meta_device_builds_shapes_only():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(256, 64), nn.Linear(64 * 2, 32))
    quantize_(model, Int4WeightOnlyConfig(symmetric=False), filter_fn=lambda m, n: n == "0")
    assert type(model[0]) is Int4Linear and model[0].weight_packed.is_meta and model[0].scales_and_zeros.is_meta
    assert type(model[1]) is nn.Linear


def test_apply_qat_is_quantize_with_a_qat_config(tiny):
    from grace.distill import FakeQuantLinear

    assert apply_qat(tiny, QATConfig(bits=16)) == []
    expected = target_linears(tiny)
    assert quantize_(tiny, QATConfig(bits=4)) == expected
    assert all(type(tiny.get_submodule(n)) is FakeQuantLinear for n in expected)
