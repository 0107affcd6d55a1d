"""GPTQ packing (AutoGPTQ / AutoRound): sequential nibbles along the input dim, zero points stored minus one."""

import pytest
import torch
from safetensors.torch import load_file

from grace import GraceLoadError
from grace.quant import gptq_pack


def pack_reference(codes, axis):
    """Independent packer: word w holds the codes of positions 8w..8w+7 along `axis`, position 8w+j in bits 4j.."""
    codes = codes.to(torch.int64)
    if axis == 1:
        return pack_reference(codes.t(), 0).t()
    rows, cols = codes.shape
    words = torch.zeros(rows // 8, cols, dtype=torch.int64)
    for j in range(8):
        words |= codes[j::8] << (4 * j)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)   # same bits, as int32


@pytest.mark.parametrize("k,n", [(128, 64), (256, 40), (64, 8)])
def test_pack_matches_independent_packer_and_roundtrips(k, n):
    g = torch.Generator().manual_seed(k + n)
    codes = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(0, 16, (k // 32, n), generator=g)
    assert torch.equal(gptq_pack.pack_qweight(codes), pack_reference(codes, 0))
    assert torch.equal(gptq_pack.pack_qzeros(zeros), pack_reference(zeros, 1))
    assert torch.equal(gptq_pack.unpack_qweight(gptq_pack.pack_qweight(codes)).long(), codes)
    assert torch.equal(gptq_pack.unpack_qzeros(gptq_pack.pack_qzeros(zeros)).long(), zeros)


def test_nibble_order_is_sequential_not_awq():
    codes = torch.arange(8).reshape(8, 1).repeat(1, 8)          # input row r holds code r
    word = gptq_pack.pack_qweight(codes)[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == list(range(8))
    assert gptq_pack.pack_qzeros(torch.full((1, 8), 7))[0, 0].item() == 0x77777777


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("zero_offset", [1, 0])
def test_decode_and_dequantize_agree_with_the_formula(group, zero_offset):
    g = torch.Generator().manual_seed(group)
    k, n = 256, 24
    q = torch.randint(0, 16, (k, n), generator=g)
    stored = torch.randint(0, 15, (k // group, n), generator=g)
    scales = (torch.randn(k // group, n, generator=g) * 0.01).half()       # signed, as AutoRound writes them
    qweight, qzeros = gptq_pack.pack_qweight(q), gptq_pack.pack_qzeros(stored)
    rows = torch.arange(k) // group
    expected = ((q.float() - (stored[rows].float() + zero_offset)) * scales.float()[rows]).t()
    assert torch.equal(gptq_pack.dequantize(qweight, qzeros, scales, group, zero_offset=zero_offset), expected)
    codes, s, z, group_out = gptq_pack.decode(qweight, qzeros, scales, group, rows.int(), zero_offset)
    assert group_out == group and torch.equal(codes.long(), q.t())
    cols = torch.arange(k) // group_out
    assert torch.equal((codes.float() - z[:, cols]) * s[:, cols], expected)


def test_per_channel_group_is_spread_over_groups_of_128():
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (512, 16), generator=g)
    stored, scales = torch.full((1, 16), 7), (torch.rand(1, 16, generator=g) + 0.1).half()
    codes, s, z, group = gptq_pack.decode(gptq_pack.pack_qweight(q), gptq_pack.pack_qzeros(stored), scales, -1)
    assert group == 128 and s.shape == (16, 4) and torch.equal(z, torch.full((16, 4), 8.0))
    cols = torch.arange(512) // 128
    assert torch.equal((codes.float() - z[:, cols]) * s[:, cols],
                       gptq_pack.dequantize(gptq_pack.pack_qweight(q), gptq_pack.pack_qzeros(stored), scales, -1))


def test_act_order_g_idx_is_refused_but_dequantize_follows_it():
    g = torch.Generator().manual_seed(2)
    k, n = 256, 8
    q = torch.randint(0, 16, (k, n), generator=g)
    stored, scales = torch.randint(0, 15, (2, n), generator=g), torch.rand(2, n, generator=g).half()
    g_idx = (torch.arange(k) // 128)[torch.randperm(k, generator=g)].int()
    qweight, qzeros = gptq_pack.pack_qweight(q), gptq_pack.pack_qzeros(stored)
    with pytest.raises(GraceLoadError, match="act-order"):
        gptq_pack.decode(qweight, qzeros, scales, 128, g_idx)
    w = gptq_pack.dequantize(qweight, qzeros, scales, 128, g_idx)
    row = 5
    assert torch.equal(w[:, row], (q[row].float() - stored[g_idx[row]].float() - 1) * scales[g_idx[row]].float())


def test_mismatched_shapes_are_refused():
    qweight = gptq_pack.pack_qweight(torch.zeros(256, 16, dtype=torch.int64))
    with pytest.raises(GraceLoadError, match="do not fit"):
        gptq_pack.decode(qweight, torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, 16).half(), 128)


@pytest.mark.parametrize("name", ["qwen3vl-tiny-autoround-gptq", "qwen3vl-tiny-autoround"])
def test_fixture_tensors_decode_by_the_readme_rules(fixtures_dir, name):
    tensors = load_file(fixtures_dir / name / "model.safetensors")
    module = "model.language_model.layers.1.mlp.down_proj"
    qweight, qzeros, scales = (tensors[f"{module}.{s}"] for s in ("qweight", "qzeros", "scales"))
    assert torch.equal(qzeros, torch.full_like(qzeros, 0x77777777))
    assert (scales < 0).any() and (scales > 0).any()
    if f"{module}.g_idx" in tensors:
        assert torch.equal(tensors[f"{module}.g_idx"].long(), torch.arange(256) // 128)
    w = gptq_pack.dequantize(qweight, qzeros, scales, 128)
    # symmetric: W = s * (q - 8), and each group's largest |w| sits at code -8 (stored 0)
    codes = gptq_pack.unpack_qweight(qweight).float()
    assert torch.equal(w, ((codes - 8) * scales.float().repeat_interleave(128, 0)).t())
    assert (codes.reshape(2, 128, -1).amin(1) == 0).all()
