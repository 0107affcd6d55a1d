"""QAT fake quantization: grid, MSE init, LSQ straight-through gradients, model surgery, release sidecar."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grace.distill import (FakeQuantLinear, QATConfig, apply_qat, fake_quantize, freeze_vision, init_log_scale_mse,
                           mean_quant_scale, qat_param_groups, qat_state_dict, strip_qat)
from grace.quant.primitives import codes_on_grid


def heavy_tailed(seed, out_features, in_features, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(2.0)).sample((out_features, in_features))  # global RNG: seed it
    return (t * 0.02 + 0.001 * torch.randn(out_features, in_features, generator=g)).to(dtype)


def linear(seed, out_features, in_features, bias=True, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(heavy_tailed(seed, out_features, in_features))
    return layer


def expand(per_group, group_size):
    """[out, groups] -> [out, groups * group_size], each group's value over its own input columns."""
    return per_group.repeat_interleave(group_size, dim=1)


@pytest.mark.parametrize("seed,bits,shape,group", [(0, 4, (16, 256), 128), (1, 8, (8, 384), 128), (2, 4, (5, 64), 32)])
def test_codes_in_range_and_weights_on_grid(seed, bits, shape, group):
    module = FakeQuantLinear.from_linear(linear(seed, *shape), QATConfig(bits=bits, group_size=group))
    codes, scales = module.codes(), module.scales()
    assert codes.dtype == torch.int8 and codes.shape == shape
    assert scales.dtype == torch.float32 and scales.shape == (shape[0], shape[1] // group)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    torch.testing.assert_close(module.quantized_weight(), codes.float() * expand(scales, group), rtol=0, atol=0)
    x = torch.randn(3, shape[1])
    torch.testing.assert_close(module(x), x @ (codes.float() * expand(scales, group)).T + module.bias)


def test_codes_clamp_when_the_step_is_too_small():
    weight = torch.tensor([[1.0] * 4 + [-1.0] * 4])
    module = FakeQuantLinear(nn.Parameter(weight), None, torch.full((1, 2), math.log(0.01)), bits=4, group_size=4)
    assert module.codes().tolist() == [[7] * 4 + [-8] * 4]
    torch.testing.assert_close(module.quantized_weight(), torch.tensor([[0.07] * 4 + [-0.08] * 4]))


def test_groups_run_along_the_input_dimension():
    weight = torch.full((4, 256), 0.01)
    weight[2, 130] = 5.0                     # row 2, input column 130: group (2, 1)
    steps = init_log_scale_mse(weight, 4, 128).exp()
    big = steps > 0.1
    assert big.tolist() == [[False, False], [False, False], [False, True], [False, False]]


def mse_init_loop(weight, bits, group, candidates, lo, hi):
    """Per group, try each candidate step in turn and keep the first best one (float64 loops)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = torch.empty(weight.shape[0], weight.shape[1] // group, dtype=torch.float64)
    for o in range(weight.shape[0]):
        for j in range(weight.shape[1] // group):
            w = weight[o, j * group:(j + 1) * group].double()
            best, best_err = None, math.inf
            for k in range(candidates):
                c = lo + (hi - lo) * k / (candidates - 1)
                s = w.abs().max().item() * c / qmax
                err = ((torch.clamp(torch.round(w / s), qmin, qmax) * s - w) ** 2).sum().item()
                if err < best_err:
                    best, best_err = s, err
            out[o, j] = best
    return out


@pytest.mark.parametrize("seed,bits", [(3, 4), (4, 8)])
def test_mse_init_matches_a_loop_search(seed, bits):
    weight = heavy_tailed(seed, 6, 128)
    got = init_log_scale_mse(weight, bits, 32, candidates=20, lo=0.3, hi=1.2).exp()
    torch.testing.assert_close(got.double(), mse_init_loop(weight, bits, 32, 20, 0.3, 1.2), rtol=1e-5, atol=0)


def test_mse_init_beats_max_abs_on_heavy_tailed_weights():
    """At 4 bits clipping the tails pays. (At 8 bits the best step is ~max|w|/qmax itself, which the
    20-point grid over [0.3, 1.2] misses by up to 2.4%, so there the search is not guaranteed to win.)"""
    weight = heavy_tailed(5, 64, 512)
    qmax = 7
    max_abs = weight.reshape(64, 4, 128).abs().amax(-1) / qmax

    def error(steps):
        s = expand(steps, 128)
        return ((torch.clamp(torch.round(weight / s), -qmax - 1, qmax) * s - weight) ** 2).sum().item()

    assert error(init_log_scale_mse(weight, 4, 128).exp()) < 0.9 * error(max_abs)


def test_weight_gradient_is_upstream_inside_the_range_and_zero_outside():
    g = torch.Generator().manual_seed(6)
    weight = (torch.randn(4, 64, generator=g) * 0.1).requires_grad_(True)
    log_scale = torch.full((4, 2), math.log(0.02))           # some weights beyond 7 steps: clamped
    upstream = torch.randn(4, 64, generator=g)
    fake_quantize(weight, log_scale, 4, 32).backward(upstream)
    ratio = weight.detach() / 0.02
    inside = (ratio >= -8) & (ratio <= 7)
    assert inside.any() and (~inside).any()
    assert (weight.grad[~inside] == 0).all()
    torch.testing.assert_close(weight.grad[inside], upstream[inside], rtol=1e-6, atol=0)   # (g * s) / s in fp32


def lsq_scale_gradient(weight, step, upstream, bits, group):
    """Esser et al. (LSQ), eq. 3: dv^/ds = -v/s + round(v/s) inside, -Qn or Qp outside; summed per group."""
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    v = weight.double()
    s = expand(step.double(), group)
    r = v / s
    d = torch.where(r <= -qn, torch.full_like(r, -qn), torch.where(r >= qp, torch.full_like(r, qp), -r + torch.round(r)))
    return (upstream.double() * d).reshape(weight.shape[0], -1, group).sum(-1)


@pytest.mark.parametrize("seed,bits,grad_scale", [(7, 4, False), (8, 8, False), (9, 4, True)])
def test_log_scale_gradient_is_lsq(seed, bits, grad_scale):
    layer = linear(seed, 6, 256, bias=False)
    config = QATConfig(bits=bits, group_size=128, lsq_grad_scale=grad_scale)
    module = FakeQuantLinear.from_linear(layer, config)
    with torch.no_grad():
        module.log_scale -= 0.7                        # smaller steps: some weights fall outside the range
    upstream = torch.randn(6, 256, generator=torch.Generator().manual_seed(seed))
    module.fake_quantized_weight().backward(upstream)

    step = module.log_scale.detach().exp()
    factor = 1 / math.sqrt(128 * (2 ** (bits - 1) - 1)) if grad_scale else 1.0
    expected = lsq_scale_gradient(layer.weight.detach(), step, upstream, bits, 128) * step.double() * factor
    torch.testing.assert_close(module.log_scale.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_log_scale_gradient_against_finite_differences_of_the_ste_surrogate():
    """With the rounding residue held at its current value (what the STE assumes), W_dq(s) is smooth in
    log_scale; central differences of sum(G * W_dq) must match the analytic gradient."""
    layer = linear(10, 3, 64, bias=False)
    weight = layer.weight.detach().double()
    log_scale = (init_log_scale_mse(weight, 4, 32) - 0.5).double()
    upstream = torch.randn(3, 64, generator=torch.Generator().manual_seed(10), dtype=torch.float64)

    s0 = expand(log_scale.exp(), 32)
    residue = torch.round((weight / s0).clamp(-8, 7)) - (weight / s0).clamp(-8, 7)

    def surrogate(ls):
        s = expand(ls.exp(), 32)
        return (upstream * s * ((weight / s).clamp(-8, 7) + residue)).sum()

    h = 1e-6
    numeric = torch.zeros_like(log_scale)
    for o in range(3):
        for j in range(2):
            plus, minus = log_scale.clone(), log_scale.clone()
            plus[o, j] += h
            minus[o, j] -= h
            numeric[o, j] = (surrogate(plus) - surrogate(minus)) / (2 * h)

    leaf = log_scale.clone().requires_grad_(True)
    (upstream * fake_quantize(weight, leaf, 4, 32)).sum().backward()
    torch.testing.assert_close(leaf.grad, numeric, rtol=1e-5, atol=1e-8)


def test_bf16_weight():
    layer = linear(11, 8, 128, dtype=torch.bfloat16)
    module = FakeQuantLinear.from_linear(layer, QATConfig(bits=4))
    assert module.weight is layer.weight and module.log_scale.dtype == torch.float32
    y = module(torch.randn(2, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert module.weight.grad.dtype == torch.bfloat16 and module.log_scale.grad.dtype == torch.float32
    assert module.quantized_weight().dtype == torch.bfloat16
    torch.testing.assert_close(module.codes(), torch.round(module.quantized_weight().float()
                                                           / expand(module.scales(), 128)).to(torch.int8))


LANGUAGE_LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.fixture
def tiny():
    from grace.tiny import tiny_qwen3vl

    model, _ = tiny_qwen3vl(seed=0)
    return model


def test_apply_qat_on_tiny_qwen3vl(tiny):
    weights = {n: m.weight for n, m in tiny.named_modules() if isinstance(m, nn.Linear)}
    names = apply_qat(tiny, QATConfig(bits=4))
    layers = tiny.config.text_config.num_hidden_layers
    assert sorted(names) == sorted(f"model.language_model.layers.{i}.{leaf}"
                                   for i in range(layers) for leaf in LANGUAGE_LINEARS)
    for name in names:
        module = tiny.get_submodule(name)
        assert isinstance(module, FakeQuantLinear) and module.weight is weights[name]
    remaining = [n for n, m in tiny.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head" in remaining and any("merger" in n for n in remaining)
    assert all(any(k in n for k in ("visual", "merger", "lm_head")) for n in remaining)


def test_apply_qat_no_op_and_errors(tiny):
    assert apply_qat(tiny, QATConfig(bits=16)) == []
    with pytest.raises(ValueError, match="group_size=256"):
        apply_qat(tiny, QATConfig(bits=4, group_size=256))
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny.modules())    # nothing half-replaced
    with pytest.raises(ValueError, match="2, 3, 4, 8 or 16"):
        QATConfig(bits=5)


def test_strip_qat_keeps_outputs(tiny):
    apply_qat(tiny, QATConfig(bits=4))
    input_ids = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny(input_ids=input_ids).logits
    grids = {n: m.quantized_weight() for n, m in tiny.named_modules() if isinstance(m, FakeQuantLinear)}
    assert strip_qat(tiny) is tiny
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny.modules())
    for name, grid in grids.items():
        module = tiny.get_submodule(name)
        assert type(module) is nn.Linear and torch.equal(module.weight, grid)
    with torch.no_grad():
        after = tiny(input_ids=input_ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_sidecar_layout_and_code_round_trip(tiny, bits):
    apply_qat(tiny, QATConfig(bits=bits))
    modules = {n: m for n, m in tiny.named_modules() if isinstance(m, FakeQuantLinear)}
    state = qat_state_dict(tiny)
    assert set(state) == {f"{n}.{k}" for n in modules for k in ("weight", "log_scale")}
    for name, module in modules.items():
        w_dq, flat = state[f"{name}.weight"], state[f"{name}.log_scale"]
        out_f, in_f = module.weight.shape
        assert w_dq.dtype == torch.bfloat16 and w_dq.shape == (out_f, in_f) and w_dq.device.type == "cpu"
        assert flat.dtype == torch.float32 and flat.shape == (out_f * in_f // 128,)
        for o, j in [(0, 0), (out_f - 1, in_f // 128 - 1), (out_f // 2, 0)]:
            assert flat[o * (in_f // 128) + j] == module.log_scale[o, j]      # row-major over [out, groups]
        recovered = torch.round(w_dq.float() / expand(flat.exp().reshape(out_f, -1), 128))
        assert torch.equal(recovered.to(torch.int8), module.codes())
        codes, _ = codes_on_grid(w_dq, bits, 128, flat.exp())                # the release loader's path
        assert torch.equal(codes, module.codes())


def test_param_groups(tiny):
    apply_qat(tiny, QATConfig(bits=4))
    frozen = freeze_vision(tiny)
    assert frozen > 0 and all(not p.requires_grad for n, p in tiny.named_parameters() if "visual" in n)
    groups = {g["name"]: g for g in qat_param_groups(tiny, lr=1e-5, scale_lr=1e-3, weight_decay=0.1)}
    assert set(groups) == {"decay", "no_decay", "log_scale"}
    by_id = {id(p): n for n, p in tiny.named_parameters()}
    names = {k: {by_id[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert groups["log_scale"]["lr"] == 1e-3 and groups["log_scale"]["weight_decay"] == 0.0
    assert groups["decay"]["lr"] == 1e-5 and groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert names["log_scale"] == {n for n in by_id.values() if n.endswith(".log_scale")}
    assert all("norm" in n or n.endswith(".bias") for n in names["no_decay"])
    assert "model.language_model.norm.weight" in names["no_decay"]
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in names["decay"]
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert names["decay"] | names["no_decay"] | names["log_scale"] == trainable
    assert sum(len(v) for v in names.values()) == len(trainable)          # disjoint
    torch.optim.AdamW(list(groups.values()))                               # accepted by an optimizer


def test_mean_quant_scale(tiny):
    assert math.isnan(mean_quant_scale(tiny))
    apply_qat(tiny, QATConfig(bits=4))
    steps = [m.log_scale.detach().exp().flatten() for m in tiny.modules() if isinstance(m, FakeQuantLinear)]
    total = sum(s.sum().item() for s in steps) / sum(s.numel() for s in steps)
    assert mean_quant_scale(tiny) == pytest.approx(total, rel=1e-5)


def test_one_training_step_moves_weights_and_scales(tiny):
    apply_qat(tiny, QATConfig(bits=4))
    freeze_vision(tiny)
    optimizer = torch.optim.AdamW(qat_param_groups(tiny, lr=1e-3, scale_lr=1e-2, weight_decay=0.0))
    q_proj = tiny.model.language_model.layers[0].self_attn.q_proj
    weight, log_scale = q_proj.weight.detach().clone(), q_proj.log_scale.detach().clone()
    input_ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(1))
    tiny.train()
    F.cross_entropy(tiny(input_ids=input_ids).logits[0, :-1], input_ids[0, 1:]).backward()
    optimizer.step()
    assert not torch.equal(q_proj.weight, weight) and not torch.equal(q_proj.log_scale, log_scale)
