import pytest
import torch
from safetensors.torch import load_file

from grace.quant import awq_pack


@pytest.fixture(scope="module")
def vectors(fixtures_dir):
    data = load_file(fixtures_dir / "awq_gemm_vectors.safetensors")
    return {i: {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(f"case{i}.")} for i in range(5)}


@pytest.mark.parametrize("case", range(5))
def test_unpack_repack_bit_exact(vectors, case):
    v = vectors[case]
    for key in ("qweight", "qzeros"):
        assert torch.equal(awq_pack.pack(awq_pack.unpack(v[key])), v[key])


@pytest.mark.parametrize("case", range(5))
def test_dequantize_matches_autoawq(vectors, case):
    v = vectors[case]
    weight = awq_pack.dequantize(v["qweight"], v["qzeros"], v["scales"], int(v["group_size"]))
    assert torch.equal(weight, v["weight_dequant"])
    y = v["x"] @ weight.t() + v["bias"].float()
    assert torch.allclose(y, v["y"], atol=1e-4, rtol=1e-5)


def test_nibble_order_is_awq_interleaved():
    codes = torch.arange(8, dtype=torch.int32).reshape(1, 8)       # column c holds value c
    packed = awq_pack.pack(codes).item() & 0xFFFFFFFF
    nibbles = [(packed >> (4 * k)) & 0xF for k in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        awq_pack.pack(torch.full((2, 8), 16))
    with pytest.raises(ValueError):
        awq_pack.pack(torch.zeros(2, 6, dtype=torch.int32))


def test_random_roundtrip():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (64, 48), generator=g)
    assert torch.equal(awq_pack.unpack(awq_pack.pack(codes)).long(), codes)
