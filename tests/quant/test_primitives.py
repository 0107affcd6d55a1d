"""grace.quant.primitives: code ranges, groups, symmetric / asymmetric round-to-nearest, grid recovery."""

import itertools

import pytest
import torch

from grace.quant import primitives as P


@pytest.mark.parametrize("bits,signed,expected", [(4, True, (-8, 7)), (8, True, (-128, 127)), (4, False, (0, 15)),
                                                  (8, False, (0, 255)), (2, True, (-2, 1)), (3, False, (0, 7))])
def test_code_range(bits, signed, expected):
    assert P.code_range(bits, signed) == expected


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_code_range_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        P.code_range(bits)


def test_groups_run_along_input_columns():
    weight = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8)
    groups = P.to_groups(weight, 4)
    assert groups.shape == (2, 2, 4)
    assert groups[1, 1].tolist() == [12, 13, 14, 15]              # row 1, input columns 4..7
    assert P.per_column(torch.tensor([[1.0, 2.0]]), 3).tolist() == [[1, 1, 1, 2, 2, 2]]
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        P.to_groups(weight, 3)


def symmetric_by_loops(weight, bits, group):
    """Independent reference: per group, s = max|w| / qmax, q = round-half-even(w / s) clamped."""
    qmax = 2 ** (bits - 1) - 1
    codes = torch.empty(weight.shape, dtype=torch.int64)
    scales = torch.empty(weight.shape[0], weight.shape[1] // group)
    for o, j in itertools.product(range(weight.shape[0]), range(weight.shape[1] // group)):
        w = weight[o, j * group:(j + 1) * group].double()
        s = max(w.abs().max().item() / qmax, P.MIN_SCALE)
        scales[o, j] = s
        codes[o, j * group:(j + 1) * group] = torch.round(w / s).clamp(-qmax - 1, qmax).long()
    return codes, scales


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 16), (4, 64)])
def test_symmetric_codes_match_a_loop_reference(bits, group):
    weight = torch.randn(5, 128, generator=torch.Generator().manual_seed(bits + group)) * 0.05
    codes, scales = P.quantize_symmetric(weight, bits, group)
    ref_codes, ref_scales = symmetric_by_loops(weight, bits, group)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    assert (codes.long() - ref_codes).abs().max() <= 1            # fp32 vs fp64 division may flip an exact tie
    assert (codes.long() != ref_codes).float().mean() < 0.01
    # the peak of every group lands on +qmax or -qmax: the range is used, not wasted
    peak_codes = codes.long().reshape(5, -1, group).abs().amax(-1)
    assert (peak_codes == 2 ** (bits - 1) - 1).all()
    # and the reconstruction is within half a step everywhere
    err = (P.dequantize(codes, scales, group) - weight).abs()
    assert (err <= P.per_column(scales, group) / 2 + 1e-7).all()


def test_symmetric_fp16_scales_are_representable_and_codes_use_them():
    weight = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    codes, scales = P.quantize_symmetric(weight, 4, 128, scale_dtype=torch.float16)
    assert torch.equal(scales, scales.half().float())
    assert torch.equal(codes, P.round_codes(weight, scales, 4, 128))


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_codes_cover_the_range_and_reconstruct(bits):
    g = torch.Generator().manual_seed(bits)
    weight = torch.rand(6, 256, generator=g) * 0.1 - 0.02         # mostly positive: zero points far from the middle
    codes, scales, zeros = P.quantize_asymmetric(weight, bits, 128)
    qmax = 2 ** bits - 1
    assert codes.dtype == torch.uint8 and codes.min() >= 0 and codes.max() <= qmax
    assert zeros.min() >= 0 and zeros.max() <= qmax and torch.equal(zeros, zeros.round())
    lo = weight.reshape(6, 2, 128).amin(-1).clamp(max=0)
    hi = weight.reshape(6, 2, 128).amax(-1).clamp(min=0)
    torch.testing.assert_close(scales, (hi - lo) / qmax)
    torch.testing.assert_close(zeros, torch.round(-lo / scales))
    err = (P.dequantize(codes, scales, 128, zeros) - weight).abs()
    # half a step, plus at most half a step for the rounded zero point at the ends of the range
    assert (err <= P.per_column(scales, 128) + 1e-7).all()
    assert err.mean() < 0.3 * scales.mean()
    sym_codes, sym_scales = P.quantize_symmetric(weight, bits, 128)
    sym_err = (P.dequantize(sym_codes, sym_scales, 128) - weight).abs().mean()
    assert err.mean() < sym_err                                    # one-sided weights: the zero point pays


def test_asymmetric_all_positive_group_has_zero_point_zero():
    weight = torch.linspace(0.1, 1.6, 16).reshape(1, 16)
    codes, scales, zeros = P.quantize_asymmetric(weight, 4, 16)
    assert zeros.item() == 0 and scales.item() == pytest.approx(1.6 / 15)
    assert codes.max().item() == 15


def test_asymmetric_fp16_scales_feed_the_zero_points():
    weight = torch.randn(3, 128, generator=torch.Generator().manual_seed(4)) * 0.03
    codes, scales, zeros = P.quantize_asymmetric(weight, 4, 128, scale_dtype=torch.float16)
    assert torch.equal(scales, scales.half().float())
    lo = weight.reshape(3, 1, 128).amin(-1).clamp(max=0)
    assert torch.equal(zeros, torch.round(-lo / scales).clamp(0, 15))


@pytest.mark.parametrize("asymmetric", [False, True])
def test_all_zero_groups_stay_exactly_zero(asymmetric):
    weight = torch.zeros(2, 256)
    weight[1, 128:] = torch.linspace(-1, 1, 128)                  # one non-zero group among zero ones
    if asymmetric:
        codes, scales, zeros = P.quantize_asymmetric(weight, 4, 128, scale_dtype=torch.float16)
    else:
        codes, scales = P.quantize_symmetric(weight, 4, 128, scale_dtype=torch.float16)
        zeros = None
    assert torch.isfinite(scales).all() and (scales > 0).all()    # finite, positive step even for zeros
    restored = P.dequantize(codes, scales, 128, zeros)
    assert torch.equal(restored[0], torch.zeros(256)) and torch.equal(restored[1, :128], torch.zeros(128))
    bound = scales[1, 1] * (1 if asymmetric else 0.5)                # (the rounded zero point can add half a step)
    assert (restored[1, 128:] - weight[1, 128:]).abs().max() <= bound + 1e-6


def test_round_codes_clamps_to_the_range():
    weight = torch.tensor([[10.0, -10.0, 0.5, -0.5]])
    assert P.round_codes(weight, torch.tensor([[1.0]]), 4, 4).tolist() == [[7, -8, 0, 0]]   # ties to even
    assert P.round_codes(weight, torch.tensor([[1.0]]), 4, 4, torch.tensor([[8.0]])).tolist() == [[15, 0, 8, 8]]


def test_signed_to_unsigned_and_offsets_round_trip():
    codes = torch.tensor([[-8, -1, 0, 7]], dtype=torch.int8)
    assert P.signed_to_unsigned(codes, 4).tolist() == [[0, 7, 8, 15]]
    scales = torch.tensor([[0.5, 0.25]])
    zeros = torch.tensor([[3.0, 12.0]])
    offsets = (8 - zeros) * scales
    assert torch.equal(P.zero_points_from_offsets(scales, offsets, 4), zeros)


@pytest.mark.parametrize("bits,tolerance", [(4, 2 ** -7), (8, 2 ** -5)])
def test_grid_steps_recover_a_bf16_stored_grid(bits, tolerance):
    """At 8 bits bf16 storage leaves ~0.4 of a step of error, so a coarser grid can fit about as well:
    the inferred weights are then within ~1-2% of the group's peak, not exact (hence the sidecar)."""
    g = torch.Generator().manual_seed(bits)
    qmax = 2 ** (bits - 1) - 1
    steps = torch.rand(8, 2, generator=g) * 0.01 + 0.001
    codes = torch.randint(-qmax - 1, qmax + 1, (8, 256), generator=g)
    codes[:, 0] = qmax                                              # each first group reaches the top code
    weight = (codes * P.per_column(steps, 128)).to(torch.bfloat16)
    inferred = P.grid_steps(weight, bits, 128)
    again = P.dequantize(P.round_codes(weight, inferred, bits, 128), inferred, 128)
    # the inferred grid gives the stored weights back, up to `tolerance` of the group's peak
    bf16_error = P.per_column(P.to_groups(weight, 128).abs().amax(-1), 128) * tolerance
    assert ((again - weight.float()).abs() <= bf16_error).all()
    if bits == 4:   # coarse enough that bf16 cannot hide a wrong grid: the true steps are found
        torch.testing.assert_close(inferred, steps, rtol=2 ** -7, atol=0)
    got, given = P.codes_on_grid(weight, bits, 128, steps.reshape(-1))
    assert torch.equal(got.long(), codes) and torch.equal(given, steps)
    weight[0, :128] = 0
    assert P.grid_steps(weight, bits, 128)[0, 0] == 1.0             # an all-zero group: step 1, codes 0
