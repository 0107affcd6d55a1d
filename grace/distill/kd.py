"""Plain losses beside GRACE's: cross-entropy on answer tokens and Hinton-style KD at a temperature.

Both are pure functions of logits (rows are the answer positions, [N, V]); the objectives in
grace.train.objectives weigh and combine them. The KD baseline of the benchmark is CE + beta * kd_loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows (zero, still in the graph, when there are none)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(1, targets.numel())


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), mean over rows (zero without rows).

    The T^2 factor keeps the gradient's size independent of T (Hinton et al., 2015)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return kl.sum() / max(1, kl.numel()) * temperature ** 2
