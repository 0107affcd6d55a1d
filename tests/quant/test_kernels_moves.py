"""Packed modules stay correct however their tensors reach a device: ZeroGPU moves tensors without
Module.to(), so Int4Linear checks its layout against the tensors' device at forward and repacks once."""

import pytest
import torch

from grace.quant import int4 as q4
from grace.quant import kernels
from grace.quant.int4 import Int4Linear
from grace.quant.int8 import Int8Linear


try:
    from .kernel_cases import exact_group_weight, int4_module, int8_module, rel
except ImportError:                      # tests/ collected without packages (rootdir sys.path insertion)
    from kernel_cases import exact_group_weight, int4_module, int8_module, rel



@pytest.fixture(autouse=True)
def kernels_on_small_weights(monkeypatch):
    """The tests use small modules: let the kernels take them (production skips weights < MIN_WEIGHTS)."""
    monkeypatch.setattr(kernels, "MIN_WEIGHTS", 0)

def move_behind_its_back(module: torch.nn.Module, device) -> None:
    """What ZeroGPU does: every tensor replaced by a copy on `device`, no Module._apply."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in list(store.items()):
                if t is not None:
                    moved = t.detach().to(device)
                    store[name] = torch.nn.Parameter(moved, requires_grad=False) if isinstance(t, torch.nn.Parameter) else moved


def count_repacks(monkeypatch, cls=Int4Linear) -> list:
    calls = []
    original = cls._store
    monkeypatch.setattr(cls, "_store", lambda self, codes, params: calls.append(codes.device) or original(self, codes, params))
    return calls


def test_int4_repacks_once_when_the_bytes_arrive_in_another_devices_layout(monkeypatch):
    """Simulated on CPU with a fake device tag: the module's bytes are in the layout another device's
    kernel reads (the other CPU layout), tagged as packed for that device; then its tensors are
    replaced behind its back on the CPU. The first forward repacks, the next ones do not, and the
    output is the reference's."""
    module = int4_module(256, 64, 128)
    reference = exact_group_weight(module)
    here = module.layout
    other = "cpu" if here == "tiled" else "plain"
    module.weight_packed, module.scales_and_zeros = q4._pack(other, module.codes()), module.scales_zeros().contiguous()
    module.layout = other
    module._stored_for = (torch.device("meta"), torch.bfloat16)      # the fake tag: "packed on another device"
    assert torch.equal(exact_group_weight(module), reference)
    move_behind_its_back(module, "cpu")
    repacks = count_repacks(monkeypatch)
    x = torch.randn(2, 3, 256).to(torch.bfloat16)
    with torch.inference_mode():
        first = module(x)
        second = module(x)
    assert len(repacks) == 1 and module.layout == here
    assert torch.equal(first, second)
    assert rel(first, x.double() @ reference.t() + module.bias.double()) < 4e-3
    assert torch.equal(exact_group_weight(module), reference)


def test_int4_same_layout_on_the_new_device_is_not_repacked(monkeypatch):
    """Bytes whose layout the new device also reads (the plain nibbles) just get re-tagged."""
    module = int4_module(256, 64, 128)
    module.weight_packed, module.scales_and_zeros = q4._pack("plain", module.codes()), module.scales_zeros().contiguous()
    module.layout = "plain"
    module._stored_for = (torch.device("meta"), torch.bfloat16)
    monkeypatch.setattr(q4, "layout_for", lambda *a: "plain")
    repacks = count_repacks(monkeypatch)
    with torch.inference_mode():
        module(torch.randn(1, 256).to(torch.bfloat16))
    assert repacks == [] and module._stored_for == (torch.device("cpu"), torch.bfloat16)


def test_int4_no_repack_when_nothing_moved(monkeypatch):
    module = int4_module(256, 64, 128)
    repacks = count_repacks(monkeypatch)
    with torch.inference_mode():
        module(torch.randn(1, 256).to(torch.bfloat16))
    assert repacks == []


@pytest.mark.parametrize("make,layout", [(int4_module, q4.layout_for(torch.device("cpu"), 64, 256, 128, torch.float32)),
                                         (int8_module, "groups")])
def test_dtype_change_through_to_leaves_the_bf16_kernel_layout(make, layout):
    """module.float() keeps the device, changes the dtype: the bf16 kernels' tiles no longer apply."""
    module = make(256, 64, 128)
    reference = exact_group_weight(module)
    module.float()
    x = torch.randn(3, 256)
    y = module(x)
    assert module.layout == layout and rel(y, x.double() @ reference.t() + module.bias.double()) < 1e-5


def test_int8_tensors_replaced_behind_its_back():
    """Tensors replaced on the device they were stored for keep their layout and just work."""
    module = int8_module(256, 64, 128)
    reference = exact_group_weight(module)
    move_behind_its_back(module, "cpu")
    x = torch.randn(4, 256).to(torch.bfloat16)
    with torch.inference_mode():
        assert rel(module(x), x.double() @ reference.t() + module.bias.double()) < 4e-3
    assert module.layout == "tiled"


def test_int8_restores_once_when_the_bytes_arrive_in_another_layout(monkeypatch):
    """As for Int4Linear: group-major bytes tagged for another device, replaced on the CPU, are re-tiled once."""
    module = int8_module(256, 64, 128)
    reference = exact_group_weight(module)
    codes, scales = module.codes(), module.group_scales()
    module.qweight, module.scales = codes.reshape(64, 2, 128).transpose(0, 1).contiguous(), scales.contiguous()
    module.layout, module._stored_for = "groups", (torch.device("meta"), torch.bfloat16)
    assert torch.equal(exact_group_weight(module), reference)
    move_behind_its_back(module, "cpu")
    restores = count_repacks(monkeypatch, Int8Linear)
    x = torch.randn(2, 256).to(torch.bfloat16)
    with torch.inference_mode():
        first, second = module(x), module(x)
    assert len(restores) == 1 and module.layout == "tiled" and torch.equal(first, second)
    assert torch.equal(exact_group_weight(module), reference)



@pytest.mark.gpu
@pytest.mark.parametrize("make", [int4_module, int8_module])
def test_zerogpu_style_move_to_cuda_and_back(make):
    """The real flow: packed on CPU, tensors moved to CUDA behind the module's back, forward on CUDA;
    then moved back to CPU the same way."""
    module = make(256, 64, 128)
    reference = exact_group_weight(module)
    x = torch.randn(5, 256).to(torch.bfloat16)
    expected = x.double() @ reference.t() + module.bias.double()
    move_behind_its_back(module, "cuda")
    with torch.inference_mode():
        y = module(x.cuda())
        assert y.is_cuda and rel(y.cpu(), expected) < 4e-3
        if isinstance(module, Int4Linear):
            assert module.layout == "cuda"
        move_behind_its_back(module, "cpu")
        assert rel(module(x), expected) < 4e-3
    assert torch.equal(exact_group_weight(module).cpu(), reference)


@pytest.mark.gpu
def test_kernels_never_run_on_cuda_tensors():
    module = int8_module(256, 64, 128).cuda()
    assert not kernels.usable(torch.randn(1, 256, dtype=torch.bfloat16, device="cuda"), module.qweight)
