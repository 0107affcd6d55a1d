"""Linear centered kernel alignment (Kornblith et al., ICML 2019)."""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between representations x [n, d1] and y [n, d2] of the same n examples.

        X~, Y~ = X, Y with each column's mean removed
        CKA    = ||Y~^T X~||_F^2 / (||X~^T X~||_F ||Y~^T Y~||_F)

    which equals <HK_XH, HK_YH> / (||HK_XH|| ||HK_YH||) for the Gram matrices K = X X^T and
    H = I - 11^T/n (the Gram form; used instead when n^2 < d1 d2, as it is then cheaper). In
    [0, 1]; invariant to orthogonal transforms, isotropic scaling and shifts of either input.
    Computed in fp32 (fp64 inputs stay fp64); differentiable. NaN when an input is constant
    (zero variance), where CKA is undefined.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected [n, d1] and [n, d2] with the same n, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = _compute_dtype(x), _compute_dtype(y)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    # CKA is scale-invariant; unit Frobenius norm keeps the fourth powers below within fp32 range.
    return cka_of_centered(x / x.norm(), y / y.norm())


def cka_of_centered(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of column-centred features x [n, d1], y [n, d2], in whichever form is cheaper."""
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if n * n < d1 * d2:
        kx, ky = x @ x.T, y @ y.T          # already double-centred, since the columns are centred
        cross, self_x, self_y = (kx * ky).sum(), (kx * kx).sum(), (ky * ky).sum()
    else:
        cross = (y.T @ x).square().sum()
        self_x, self_y = (x.T @ x).square().sum(), (y.T @ y).square().sum()
    return cross / (self_x.sqrt() * self_y.sqrt())


def _compute_dtype(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()
