"""Confidence-gated decoupled knowledge distillation (GDKD) over next-token logits.

Decoupled KD (Zhao et al., CVPR 2022) splits the token-level KL into a target-class part
and a non-target part; GRACE weights each token by how confident the teacher is there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
PROB_FLOOR = 1e-8
# fp32 elements of one [tokens, vocab] chunk: ~110 tokens of a 151 936-word vocabulary (64 MiB each).
CHUNK_ELEMENTS = 1 << 24


def gated_dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 2.0, alpha: float = 1.0, beta: float = 4.0,
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Gated DKD between student and teacher next-token distributions.

    Logits are [B, L, V] (any float dtype; computed in fp32), labels [B, L] with -100 ignored;
    position i of the logits predicts labels[:, i + 1]. For each valid token i with target y,
    at temperature T (p = softmax(z_s / T), q = softmax(z_t / T)):

        b(p)   = [p_y, 1 - p_y]                      (each clamped to >= 1e-8)
        TCKD_i = KL(b(q) || b(p)) = sum_k b(q)_k (log b(q)_k - log b(p)_k)
        p~_j   = p_j / (1 - p_y),  j != y            (non-target classes, renormalised)
        NCKD_i = KL(q~ || p~)
        L_i    = (alpha * TCKD_i + beta * NCKD_i) * T^2
        g_i    = exp(-H_i / log V),  H_i = -sum_j r_j log r_j,  r = softmax(z_t)   (T = 1)
        loss   = sum_i g_i L_i / sum_i g_i

    g_i lies in [1/e, 1]: 1 for a one-hot (certain) teacher, 1/e for a uniform one. The gate
    is a weight, not a path for gradients; the teacher gets no gradient at all.

    Tokens are processed `chunk_tokens` at a time (default: about 2^24 logits per chunk) and
    each chunk's gradient is taken as it goes, so memory holds one chunk's [tokens, V] fp32
    intermediates plus one gradient shaped like the student logits (see _ChunkedGatedDKD).

    Returns (loss, stats) with stats = {"gate_mean", "gate_min", "gate_max", "tckd", "nckd",
    "tokens"}: python floats (tckd / nckd are unweighted token means) and an int. With no
    valid token the loss is a zero that still depends on the student logits (backward works,
    gradients are zero), the gate and KD stats are NaN and "tokens" is 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(f"expected logits [B, L, V] and labels [B, L], got {tuple(student_logits.shape)} "
                         f"and {tuple(labels.shape)}")
    batch, length, vocab = student_logits.shape
    teacher_logits = teacher_logits.detach()

    # Row b*L + i of the flattened logits predicts labels[b, i + 1]; the last position predicts nothing.
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    rows = (targets != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
    if rows.numel() == 0:
        nan = float("nan")
        zero = student_logits.sum().float() * 0.0
        return zero, {"gate_mean": nan, "gate_min": nan, "gate_max": nan, "tckd": nan, "nckd": nan, "tokens": 0}
    targets = targets.reshape(-1)[rows]
    student_rows = student_logits.reshape(batch * length, vocab)
    teacher_rows = teacher_logits.reshape(batch * length, vocab)
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // vocab)

    with torch.no_grad():
        gate = torch.cat([teacher_confidence_gate(teacher_rows.index_select(0, rows[i:i + chunk]))
                          for i in range(0, rows.numel(), chunk)])
    loss, tckd, nckd = _ChunkedGatedDKD.apply(student_rows, teacher_rows, rows, targets, gate / gate.sum(),
                                              temperature, alpha, beta, chunk)
    stats = {"gate_mean": gate.mean().item(), "gate_min": gate.min().item(), "gate_max": gate.max().item(),
             "tckd": tckd.mean().item(), "nckd": nckd.mean().item(), "tokens": int(rows.numel())}
    return loss, stats


def teacher_confidence_gate(teacher_logits: torch.Tensor) -> torch.Tensor:
    """g = exp(-H(softmax(z_t)) / log V) per row of [N, V] logits, in fp32 (1 = certain teacher)."""
    probs = F.softmax(teacher_logits.float(), dim=-1)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)   # xlogy: 0 log 0 = 0 for masked (-inf) logits
    return torch.exp(-entropy / math.log(teacher_logits.shape[-1]))


class _ChunkedGatedDKD(torch.autograd.Function):
    """sum_i w_i L_i over token chunks, with d/d(student logits) computed chunk by chunk in forward.

    Only one chunk's [tokens, V] fp32 intermediates exist at a time; the gradient goes straight
    into one buffer shaped like the student logits (what autograd would allocate anyway), and
    backward just scales it. Per-token TCKD / NCKD come back too, without gradient.
    """

    @staticmethod
    def forward(ctx, student_rows, teacher_rows, rows, targets, weights, temperature, alpha, beta, chunk):
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student_rows) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=student_rows.device)
        tckds, nckds = [], []
        for start in range(0, rows.numel(), chunk):
            index, target, weight = rows[start:start + chunk], targets[start:start + chunk], weights[start:start + chunk]
            z_s = student_rows.index_select(0, index).float()
            z_t = teacher_rows.index_select(0, index).float()
            with torch.enable_grad():
                z_s.requires_grad_(need_grad)
                tckd, nckd = decoupled_kl(z_s, z_t, target, temperature)
                chunk_loss = (weight * (alpha * tckd + beta * nckd)).sum() * temperature ** 2
            if need_grad:
                (grad_rows,) = torch.autograd.grad(chunk_loss, z_s)
                grad.index_copy_(0, index, grad_rows.to(grad.dtype))
            loss += chunk_loss.detach()
            tckds.append(tckd.detach())
            nckds.append(nckd.detach())
        tckd, nckd = torch.cat(tckds), torch.cat(nckds)
        ctx.mark_non_differentiable(tckd, nckd)
        ctx.save_for_backward(grad)
        return loss, tckd, nckd

    @staticmethod
    def backward(ctx, grad_loss, _grad_tckd, _grad_nckd):
        (grad,) = ctx.saved_tensors
        grad_student = None if grad is None else grad * grad_loss.to(grad.dtype)
        return grad_student, None, None, None, None, None, None, None, None


def decoupled_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) per row of [N, V] logits with targets [N]; each [N] fp32, not yet scaled by T^2."""
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    target = target.unsqueeze(1)

    # Binary target / rest distributions.
    p_y = F.softmax(z_s, dim=-1).gather(1, target).squeeze(1)
    q_y = F.softmax(z_t, dim=-1).gather(1, target).squeeze(1)
    b_s = torch.stack((p_y, 1.0 - p_y), dim=-1).clamp_min(PROB_FLOOR)
    b_t = torch.stack((q_y, 1.0 - q_y), dim=-1).clamp_min(PROB_FLOOR)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1)

    # Non-target distributions: the target logit is removed exactly (-inf), so softmax over the
    # rest is the renormalised p~; its log is zeroed at the target, where q~ is 0, to avoid inf - inf.
    is_target = torch.zeros_like(z_s, dtype=torch.bool).scatter_(1, target, True)
    log_p_rest = F.log_softmax(z_s.masked_fill(is_target, float("-inf")), dim=-1).masked_fill(is_target, 0.0)
    log_q_rest = F.log_softmax(z_t.masked_fill(is_target, float("-inf")), dim=-1).masked_fill(is_target, 0.0)
    nckd = (log_q_rest.exp().masked_fill(is_target, 0.0) * (log_q_rest - log_p_rest)).sum(-1)
    return tckd, nckd
