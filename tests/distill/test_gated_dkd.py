"""gated_dkd_loss against independent formulations: mdistiller's DKD and a per-token float64 loop."""

import math

import pytest
import torch
import torch.nn.functional as F

import grace.distill.gated_dkd as gated_dkd_module
from grace.distill import gated_dkd_loss


def mdistiller_dkd_per_token(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller's dkd_loss (mdistiller/distillers/DKD.py), per token instead of batch-summed."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        return torch.cat([(t * mask1).sum(1, keepdims=True), (t * mask2).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="none").sum(1) * temperature ** 2
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="none").sum(1) * temperature ** 2
    return alpha * tckd + beta * nckd, tckd / temperature ** 2, nckd / temperature ** 2


def shifted_valid(student, teacher, labels):
    """(student rows, teacher rows, targets) of the valid next-token predictions, gathered by loops."""
    s_rows, t_rows, targets = [], [], []
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if labels[b, i + 1] != -100:
                s_rows.append(student[b, i])
                t_rows.append(teacher[b, i])
                targets.append(int(labels[b, i + 1]))
    return torch.stack(s_rows), torch.stack(t_rows), torch.tensor(targets)


def per_token_loop_reference(student, teacher, labels, temperature, alpha, beta):
    """Gated DKD written token by token in float64 from the definition (probabilities clamped at 1e-8)."""
    num, den, gates = 0.0, 0.0, []
    vocab = student.shape[-1]
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            y = int(labels[b, i + 1])
            if y == -100:
                continue
            zs, zt = student[b, i].double(), teacher[b, i].double()
            p, q = torch.softmax(zs / temperature, 0), torch.softmax(zt / temperature, 0)
            bp = [max(p[y].item(), 1e-8), max(1 - p[y].item(), 1e-8)]
            bq = [max(q[y].item(), 1e-8), max(1 - q[y].item(), 1e-8)]
            tckd = sum(bq[k] * (math.log(bq[k]) - math.log(bp[k])) for k in range(2))
            nckd = 0.0
            for j in range(vocab):
                if j != y:
                    pj, qj = p[j].item() / (1 - p[y].item()), q[j].item() / (1 - q[y].item())
                    nckd += qj * (math.log(qj) - math.log(pj))
            r = torch.softmax(zt, 0)
            entropy = -sum(rj * math.log(rj) for rj in r.tolist() if rj > 0)
            gate = math.exp(-entropy / math.log(vocab))
            gates.append(gate)
            num += gate * (alpha * tckd + beta * nckd) * temperature ** 2
            den += gate
    return num / den, gates


def random_case(seed, batch=2, length=6, vocab=11, ignore_fraction=0.3, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=g) * scale
    teacher = torch.randn(batch, length, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) < ignore_fraction] = -100
    labels[0, 1] = 3   # at least one valid target
    return student, teacher, labels


@pytest.mark.parametrize("seed,shape", [(0, (2, 6, 11)), (1, (3, 5, 7)), (2, (1, 9, 32))])
def test_ungated_equals_mdistiller_dkd(monkeypatch, seed, shape):
    student, teacher, labels = random_case(seed, *shape)
    temperature, alpha, beta = 2.0, 1.0, 4.0
    monkeypatch.setattr(gated_dkd_module, "teacher_confidence_gate", lambda t: torch.ones(t.shape[0]))
    loss, stats = gated_dkd_loss(student, teacher, labels, temperature, alpha, beta)

    s, t, y = shifted_valid(student.double(), teacher.double(), labels)
    per_token, tckd, nckd = mdistiller_dkd_per_token(s, t, y, alpha, beta, temperature)
    assert loss.item() == pytest.approx(per_token.mean().item(), rel=1e-5)
    assert stats["tckd"] == pytest.approx(tckd.mean().item(), rel=1e-5)
    assert stats["nckd"] == pytest.approx(nckd.mean().item(), rel=1e-5)
    assert stats["tokens"] == y.numel()


@pytest.mark.parametrize("seed,temperature,alpha,beta", [(3, 2.0, 1.0, 4.0), (4, 1.0, 0.5, 2.0), (5, 4.0, 2.0, 8.0)])
def test_gated_matches_per_token_loop(seed, temperature, alpha, beta):
    student, teacher, labels = random_case(seed, batch=2, length=5, vocab=9)
    loss, stats = gated_dkd_loss(student, teacher, labels, temperature, alpha, beta)
    expected, gates = per_token_loop_reference(student, teacher, labels, temperature, alpha, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["gate_mean"] == pytest.approx(sum(gates) / len(gates), rel=1e-5)
    assert stats["gate_min"] == pytest.approx(min(gates), rel=1e-5)
    assert stats["gate_max"] == pytest.approx(max(gates), rel=1e-5)


def test_gradient_matches_autograd_through_reference():
    student, teacher, labels = random_case(6, batch=2, length=7, vocab=13)
    student.requires_grad_(True)
    loss, _ = gated_dkd_loss(student, teacher, labels, chunk_tokens=2)
    (3.0 * loss).backward()   # an upstream factor must reach the gradient

    ref_student = student.detach().double().requires_grad_(True)
    s, t, y = shifted_valid(ref_student, teacher.double(), labels)
    per_token, _, _ = mdistiller_dkd_per_token(s, t, y, 1.0, 4.0, 2.0)
    r = torch.softmax(t, -1)
    gate = torch.exp((r * r.log()).sum(-1) / math.log(student.shape[-1]))
    (3.0 * (gate * per_token).sum() / gate.sum()).backward()
    torch.testing.assert_close(student.grad, ref_student.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_equals_unchunked(chunk):
    student, teacher, labels = random_case(7, batch=3, length=8, vocab=17)
    results = []
    for chunk_tokens in (None, chunk):
        leaf = student.clone().requires_grad_(True)
        loss, stats = gated_dkd_loss(leaf, teacher, labels, chunk_tokens=chunk_tokens)
        loss.backward()
        results.append((loss.detach(), leaf.grad, stats))
    (loss_a, grad_a, stats_a), (loss_b, grad_b, stats_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-8)
    assert stats_a["gate_mean"] == pytest.approx(stats_b["gate_mean"], rel=1e-6)


def test_shift_and_ignore_index():
    student, teacher, labels = random_case(8, batch=2, length=6, vocab=10)
    labels[1, 3] = -100                     # position (1, 2) predicts nothing
    student.requires_grad_(True)
    loss, stats = gated_dkd_loss(student, teacher, labels)
    loss.backward()
    assert stats["tokens"] == int((labels[:, 1:] != -100).sum())

    silent = torch.zeros(labels.shape, dtype=torch.bool)
    silent[:, -1] = True                    # the last position has no next label
    silent[:, :-1] = labels[:, 1:] == -100
    assert (student.grad[silent] == 0).all()
    assert (student.grad[~silent].abs().sum(-1) > 0).all()

    # Logits where nothing is predicted do not change the loss; a labelled position does.
    moved = student.detach().clone()
    moved[silent] += torch.randn(int(silent.sum()), 10) * 5
    assert gated_dkd_loss(moved, teacher, labels)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    moved[0, 0, 0] += 3.0                   # (a shift of all logits would be invisible to softmax)
    assert labels[0, 1] != -100
    assert gated_dkd_loss(moved, teacher, labels)[0].item() != pytest.approx(loss.item(), rel=1e-4)


def test_gradient_flows_to_student_only():
    student, teacher, labels = random_case(9)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss, _ = gated_dkd_loss(student, teacher, labels)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_bf16_inputs_compute_in_fp32():
    student, teacher, labels = random_case(10, batch=2, length=6, vocab=50)
    s16 = student.bfloat16().requires_grad_(True)
    t16 = teacher.bfloat16()
    loss16, _ = gated_dkd_loss(s16, t16, labels)
    loss16.backward()
    s32 = s16.detach().float().requires_grad_(True)
    loss32, _ = gated_dkd_loss(s32, t16.float(), labels)
    loss32.backward()
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-6)
    assert s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s16.grad.float(), s32.grad, rtol=1e-2, atol=1e-5)   # bf16 rounding of the gradient


def test_gate_bounds_and_extremes():
    vocab = 20
    student, _, labels = random_case(11, batch=1, length=4, vocab=vocab)
    labels[:] = 2
    teacher = torch.zeros(1, 4, vocab)           # uniform teacher: H = log V, gate = 1/e
    _, stats = gated_dkd_loss(student, teacher, labels)
    assert stats["gate_min"] == pytest.approx(math.exp(-1), rel=1e-5)
    assert stats["gate_max"] == pytest.approx(math.exp(-1), rel=1e-5)
    teacher[..., 5] = 60.0                       # a certain teacher: H ~ 0, gate ~ 1
    _, stats = gated_dkd_loss(student, teacher, labels)
    assert stats["gate_min"] == pytest.approx(1.0, abs=1e-6)
    for seed in range(3):
        s, t, y = random_case(seed, scale=10.0)
        _, stats = gated_dkd_loss(s, t, y)
        # H <= log V, so g = exp(-H / log V) lies in [1/e, 1]
        assert math.exp(-1) - 1e-6 <= stats["gate_min"] <= stats["gate_mean"] <= stats["gate_max"] <= 1 + 1e-6
        assert stats["gate_max"] > stats["gate_min"]         # random teachers: confidence differs per token


def test_gate_weights_confident_tokens_more():
    """Two tokens, one with a confident teacher: the loss leans to that token's DKD term."""
    student, teacher, _ = random_case(12, batch=1, length=3, vocab=8)
    teacher[0, 0, 1] = 30.0                      # confident at position 0
    labels = torch.tensor([[-100, 4, 6]])
    loss, stats = gated_dkd_loss(student, teacher, labels)
    each = [gated_dkd_loss(student, teacher, torch.tensor(lab))[0].item()
            for lab in ([[-100, 4, -100]], [[-100, -100, 6]])]
    assert stats["gate_max"] > stats["gate_min"]
    w = stats["gate_max"] / (stats["gate_max"] + stats["gate_min"])
    assert loss.item() == pytest.approx(w * each[0] + (1 - w) * each[1], rel=1e-5)


def test_no_valid_token():
    student = torch.randn(2, 4, 7, requires_grad=True)
    teacher = torch.randn(2, 4, 7)
    labels = torch.full((2, 4), -100)
    labels[:, 0] = 1                             # only position 0 labelled: never a next-token target
    loss, stats = gated_dkd_loss(student, teacher, labels)
    assert loss.item() == 0.0 and stats["tokens"] == 0
    assert math.isnan(stats["gate_mean"]) and math.isnan(stats["gate_min"]) and math.isnan(stats["gate_max"])
    loss.backward()
    assert (student.grad == 0).all()


def test_real_vocabulary_size():
    """151 936 words, default chunking: agrees with mdistiller's formula on a few tokens."""
    vocab = 151_936
    g = torch.Generator().manual_seed(13)
    student = (torch.randn(1, 4, vocab, generator=g) * 2).bfloat16().requires_grad_(True)
    teacher = (torch.randn(1, 4, vocab, generator=g) * 2).bfloat16()
    labels = torch.tensor([[-100, 17, 151_000, 5]])
    loss, stats = gated_dkd_loss(student, teacher, labels)
    loss.backward()
    s, t, y = shifted_valid(student.detach().double(), teacher.double(), labels)
    per_token, _, _ = mdistiller_dkd_per_token(s, t, y, 1.0, 4.0, 2.0)
    r = torch.softmax(t, -1)
    gate = torch.exp((r * r.log()).sum(-1) / math.log(vocab))
    assert loss.item() == pytest.approx(((gate * per_token).sum() / gate.sum()).item(), rel=1e-4)
    assert stats["tokens"] == 3 and student.grad.shape == student.shape
