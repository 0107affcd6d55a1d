"""FastBF16Linear (bf16 decode off oneDNN, thread-safe) and the optional quantized lm_head."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grace
from grace.quant import bf16 as qb
from grace.quant import kernels
from grace.quant.bf16 import FastBF16Linear, fast_bf16_linears_
from grace.quant.head import quantize_head_
from grace.quant.int4 import Int4Linear
from grace.quant.int8 import Int8Linear

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="grace's CPU kernels need x86-64 AVX-512 BF16 and cc")
needs_amx = pytest.mark.skipif(not kernels.amx(), reason="needs a CPU with AMX (and Linux granting it)")



@pytest.fixture(autouse=True)
def kernels_on_small_weights(monkeypatch):
    """The tests use small modules: let the kernels take them (production skips weights < MIN_WEIGHTS)."""
    monkeypatch.setattr(kernels, "MIN_WEIGHTS", 0)

def bf16_linear(in_f=256, out_f=70, seed=0):
    torch.manual_seed(seed)
    module = nn.Linear(in_f, out_f, dtype=torch.bfloat16)
    fast_bf16_linears_(nn.Sequential(module))
    return module


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, "limit", "limit + 1", 40])
@pytest.mark.parametrize("limits", ["build", pytest.param("amx", marks=needs_amx)])    # the GEMV's row limit
def test_fast_bf16_linear_numerics_and_threshold(rows, limits, monkeypatch):
    monkeypatch.setattr(kernels, "_AMX", limits == "amx")
    limit = (qb.AMX_KERNEL_MAX_ROWS if limits == "amx" else
             qb.AVX2_KERNEL_MAX_ROWS if kernels.isa() == "avx2" else qb.KERNEL_MAX_ROWS)
    assert qb.kernel_max_rows() == limit
    rows = {"limit": limit, "limit + 1": limit + 1}.get(rows, rows)
    module = bf16_linear()
    assert type(module) is FastBF16Linear
    calls = []
    gemv = kernels.linear_bf16
    monkeypatch.setattr(kernels, "linear_bf16", lambda *a: calls.append(1) or gemv(*a))
    x = torch.randn(rows, 256).to(torch.bfloat16)
    with torch.inference_mode():
        y = module(x)
    exact = x.double() @ module.weight.double().t() + module.bias.double()
    assert ((y.double() - exact).norm() / exact.norm()).item() < 4e-3
    if rows <= limit:
        assert calls == [1]
        # one rounding of the fp32 sum: within half a bf16 ulp of the fp32 result, element-wise
        fp32 = (x.float() @ module.weight.float().t() + module.bias.float())
        assert torch.allclose(y.float(), fp32, rtol=2 ** -8, atol=1e-6)
    else:
        # torch's GEMM, in fp32 where its bf16 GEMM is slow (kernels.bf16_gemm_via_fp32)
        assert calls == [] and torch.equal(y, kernels.bf16_linear(x, module.weight, module.bias))


def test_fast_bf16_linears_keeps_parameters_tying_and_autograd():
    emb = nn.Embedding(50, 64, dtype=torch.bfloat16)
    head = nn.Linear(64, 50, bias=False, dtype=torch.bfloat16)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "proj": nn.Linear(64, 64, dtype=torch.bfloat16)})
    keys = list(model.state_dict())
    assert sorted(fast_bf16_linears_(model)) == ["head", "proj"]
    assert model["head"].weight is model["emb"].weight and list(model.state_dict()) == keys
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    model["proj"](x).float().sum().backward()            # grad enabled, weight requires grad: F.linear
    assert model["proj"].weight.grad is not None


@needs_kernels
def test_fast_bf16_linear_thread_safe_and_flag_free():
    """Threads decoding different models at once get exactly their single-thread results, and no
    process-wide oneDNN flag is touched."""
    modules = [bf16_linear(256, 96, seed=s) for s in range(4)]
    inputs = [torch.randn(1, 256, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16) for s in range(4)]
    mkldnn_before = torch.backends.mkldnn.enabled
    with torch.inference_mode():
        alone = [m(x) for m, x in zip(modules, inputs)]
    results = [[] for _ in modules]
    failures = []

    def worker(i):
        try:
            with torch.inference_mode():
                for _ in range(50):
                    results[i].append(modules[i](inputs[i]))
        except Exception as err:                          # noqa: BLE001 - reported below
            failures.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert all(torch.equal(r, alone[i]) for i in range(4) for r in results[i])
    assert torch.backends.mkldnn.enabled == mkldnn_before


# -- the quantized head ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,cls", [("int8", Int8Linear), ("int4", Int4Linear)])
@pytest.mark.parametrize("tied", [False, True])
def test_load_with_a_quantized_head(tmp_path, kind, cls, tied):
    from grace.tiny import TinyConfig, save_tiny

    folder = save_tiny(tmp_path / "m", cfg=TinyConfig(tie_word_embeddings=tied))
    plain = grace.load(folder, device="cpu")
    quant = grace.load(folder, device="cpu", head=kind)
    head = quant.model.lm_head
    assert plain.head == "bf16" and quant.head == kind and isinstance(head, cls)
    emb = quant.model.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, plain.model.get_input_embeddings().weight)
    head_bytes = sum(t.numel() * t.element_size() for t in head.buffers())
    if tied:   # the bf16 embedding is still held for input lookups: the quantized head adds its bytes
        assert quant.weight_bytes == plain.weight_bytes + head_bytes
    else:      # it replaces the bf16 head
        assert quant.weight_bytes == plain.weight_bytes - emb.numel() * emb.element_size() + head_bytes
    # the logits are those of the quantized head's dequantized weight applied to the same hidden states
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.inference_mode():
        hidden = quant.model.model(input_ids=ids).last_hidden_state
        logits = quant.model(input_ids=ids).logits
        ref = hidden.double() @ head.dequantize().double().t()
        bf16_logits = plain.model(input_ids=ids).logits
    assert ((logits.double() - ref).norm() / ref.norm()).item() < 1e-2
    # and close to, but not the same as, the bf16 head's
    assert not torch.equal(logits, bf16_logits)
    assert ((logits.double() - bf16_logits.double()).norm() / bf16_logits.double().norm()).item() < 0.2


def test_quantized_head_rejects_unknown_kinds(tmp_path):
    from grace.tiny import save_tiny

    model = grace.load(save_tiny(tmp_path / "m"), device="cpu").model
    with pytest.raises(ValueError, match="head must be one of"):
        quantize_head_(model, "int3")


def test_small_weights_stay_on_torch_kernels(monkeypatch):
    """Below MIN_WEIGHTS (tiny models) torch's lower per-call cost wins: no grace kernel is called."""
    monkeypatch.setattr(kernels, "MIN_WEIGHTS", 1 << 20)
    calls = []
    for name in ("linear_bf16", "linear_int8", "linear_int4"):
        monkeypatch.setattr(kernels, name, lambda *a, name=name: calls.append(name))
    from grace.quant import int4 as q4

    x = torch.randn(1, 256).to(torch.bfloat16)
    with torch.inference_mode():
        bf16_linear()(x)
        assert q4.layout_for(torch.device("cpu"), 64, 256, 128, torch.bfloat16) == "cpu"
    assert calls == []
