"""linear_cka against the HSIC / Gram-matrix definition, and its invariances."""

import math

import pytest
import torch

from grace.distill import linear_cka


def hsic_cka(x, y):
    """Kornblith et al.: HSIC(K, L) = tr(K H L H) / (n - 1)^2 with K = X X^T, L = Y Y^T, in float64."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return (hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))).item()


def related_pair(seed, n, d1, d2, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g)
    y = x @ torch.randn(d1, d2, generator=g) + noise * torch.randn(n, d2, generator=g) + 3.0
    return x, y


@pytest.mark.parametrize("seed,n,d1,d2", [(0, 50, 8, 12), (1, 6, 40, 30), (2, 20, 20, 20), (3, 9, 3, 64)])
def test_matches_hsic_definition(seed, n, d1, d2):
    # covers both code paths: features when n^2 >= d1*d2, Gram matrices otherwise
    x, y = related_pair(seed, n, d1, d2)
    value = linear_cka(x, y)
    assert value.item() == pytest.approx(hsic_cka(x, y), rel=1e-5, abs=1e-6)
    assert 0.0 <= value.item() <= 1.0 + 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariances(seed):
    x, y = related_pair(seed, 30, 16, 10)
    base = linear_cka(x, y).item()
    g = torch.Generator().manual_seed(100 + seed)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x @ q, y).item() == pytest.approx(base, rel=1e-4)             # orthogonal transform
    assert linear_cka(x * 37.5, y * 1e-3).item() == pytest.approx(base, rel=1e-4)   # isotropic scaling
    assert linear_cka(x + torch.randn(16, generator=g) * 10, y - 4).item() == pytest.approx(base, rel=1e-4)  # shift
    # Not invariant to an anisotropic rescaling of features: the invariances above are not trivial.
    stretch = torch.ones(16)
    stretch[0] = 20.0
    assert linear_cka(x * stretch, y).item() != pytest.approx(base, rel=1e-2)


def test_identity_and_widths():
    x, _ = related_pair(4, 25, 7, 3)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-6)
    wide = torch.cat([x, torch.zeros(25, 50)], dim=1)          # same Gram matrix, different width
    assert linear_cka(x, wide).item() == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(5)
    unrelated = linear_cka(torch.randn(400, 4, generator=g), torch.randn(400, 6, generator=g)).item()
    assert unrelated < 0.1


def test_differentiable_and_low_precision_inputs():
    x, y = related_pair(6, 12, 5, 4)
    xd = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: linear_cka(a, y.double()), (xd,))
    assert linear_cka(x.bfloat16(), y.bfloat16()).dtype == torch.float32
    assert linear_cka(x.bfloat16(), y.bfloat16()).item() == pytest.approx(hsic_cka(x.bfloat16(), y.bfloat16()),
                                                                          rel=1e-5)


def test_constant_input_is_nan_and_shape_errors():
    assert math.isnan(linear_cka(torch.ones(5, 3), torch.randn(5, 2)).item())
    with pytest.raises(ValueError):
        linear_cka(torch.randn(5, 3), torch.randn(6, 3))
