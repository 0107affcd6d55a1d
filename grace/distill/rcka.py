"""Relational CKA loss (R-CKA): align the token-to-token similarity structure within each image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cka import cka_of_centered

MIN_IMAGE_TOKENS = 4   # fewer tokens give a near-degenerate Gram matrix; such images are skipped
# An image whose tokens all point the same way (centred Gram ~ 0, e.g. a blank picture through a
# collapsed layer) has no similarity structure: 0 / 0. It is skipped alone, not the whole term.
DEGENERATE_SPREAD = 1e-6   # mean squared distance of the unit-normalised tokens from their mean


def rcka_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, input_ids: torch.Tensor,
              image_grid_thw: torch.Tensor | None, image_token_id: int, merge_size: int = 2
              ) -> tuple[torch.Tensor, dict]:
    """Mean over images of 1 - CKA between the student's and the teacher's cosine Gram matrices.

    Hidden states are [B, L, D_s] and [B, L, D_t] (widths may differ). The rows at image-token
    positions (input_ids == image_token_id), in batch-then-position order, are split per image
    into t*h*w / merge_size^2 tokens each (image_grid_thw [num_images, 3], the processor's
    order). For each image with n >= 4 tokens, with rows f_i of its features:

        K_ij   = <f_i, f_j> / (|f_i| |f_j|)                       (cosine Gram, n x n)
        K~     = H K H,  H = I - 11^T / n                         (double centring)
        CKA    = <K~_t, K~_s> / sqrt(<K~_t, K~_t> <K~_s, K~_s>)
        loss   = mean over images of (1 - CKA)

    H K H is the Gram matrix of the column-centred normalised features, so for large images
    the same quantity is computed from [D_s, D_t] feature products instead of n x n Grams.
    Computed in fp32; only the student gets a gradient.

    Returns (loss, stats), stats = {"cka": mean CKA, "cka_per_image": [float, ...] for the
    images used, "images": how many were used, "degenerate": images skipped because their tokens
    (student's or teacher's) all coincide, so that their CKA would be 0 / 0}. With no usable image
    the loss is a zero that still depends on the student hidden states, and "cka" is NaN.
    """
    if student_hidden.shape[:2] != input_ids.shape or teacher_hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} do not "
                         f"match input_ids {tuple(input_ids.shape)} in [B, L]")
    per_image = image_token_counts(image_grid_thw, merge_size)
    is_image = input_ids == image_token_id
    found = int(is_image.sum())
    if found != sum(per_image):
        raise ValueError(f"{found} image tokens in input_ids but image_grid_thw accounts for {sum(per_image)} "
                         f"(t*h*w / {merge_size}^2 per image); was a sequence truncated inside an image?")

    student_rows = student_hidden[is_image]
    teacher_rows = teacher_hidden.detach()[is_image]
    ckas, degenerate = [], 0
    for student_image, teacher_image in zip(student_rows.split(per_image), teacher_rows.split(per_image)):
        if student_image.shape[0] < MIN_IMAGE_TOKENS:
            continue
        if is_degenerate(student_image) or is_degenerate(teacher_image):
            degenerate += 1
            continue
        ckas.append(cosine_gram_cka(student_image, teacher_image))
    if not ckas:
        zero = student_hidden.sum().float() * 0.0
        return zero, {"cka": float("nan"), "cka_per_image": [], "images": 0, "degenerate": degenerate}
    cka = torch.stack(ckas)
    loss = (1.0 - cka).mean()
    values = cka.detach().tolist()
    return loss, {"cka": sum(values) / len(values), "cka_per_image": values, "images": len(values),
                  "degenerate": degenerate}


@torch.no_grad()
def is_degenerate(features: torch.Tensor) -> bool:
    """True when an image's unit-normalised token features (nearly) coincide: no structure to align."""
    unit = F.normalize(features.float(), dim=-1)
    return bool((unit - unit.mean(0, keepdim=True)).square().sum(-1).mean() < DEGENERATE_SPREAD)


def cosine_gram_cka(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """CKA between the double-centred cosine Gram matrices of [n, D_s] and [n, D_t] features (fp32)."""
    s = F.normalize(student_features.float(), dim=-1)
    t = F.normalize(teacher_features.float(), dim=-1)
    return cka_of_centered(s - s.mean(0, keepdim=True), t - t.mean(0, keepdim=True))


def image_token_counts(image_grid_thw: torch.Tensor | None, merge_size: int = 2) -> list[int]:
    """Tokens each image takes in the language model's sequence: t*h*w / merge_size^2."""
    if image_grid_thw is None or image_grid_thw.numel() == 0:
        return []
    return (image_grid_thw.prod(-1) // (merge_size * merge_size)).tolist()
