"""Sparse KD losses against dense reference math (DESIGN §4)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import losses

N, V = 12, 50


def teacher_topk(teacher_logits, k, temperature=1.0):
    logprobs = torch.log_softmax(teacher_logits / temperature, dim=-1)
    topk_logprobs, topk_ids = logprobs.topk(k, dim=-1)
    kept = torch.logsumexp(topk_logprobs, -1).clamp(max=0)
    return topk_ids, topk_logprobs, torch.log(-torch.expm1(kept))


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, V, generator=g) * 3, torch.randn(N, V, generator=g) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_kl_with_full_support_equals_dense_kl(logits, temperature):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher / temperature, V)  # K = V: the tail is empty (-inf)
    sparse = losses.tail_kl(student, ids, lp, tail, temperature=temperature, capture_temperature=temperature)
    dense = F.kl_div(torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1),
                     log_target=True, reduction="batchmean")
    assert sparse.item() == pytest.approx(dense.item(), abs=1e-6)


def test_tail_kl_full_support_gradient_matches_dense(logits):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, V)
    s1 = student.clone().requires_grad_(True)
    losses.tail_kl(s1, ids, lp, tail).backward()
    s2 = student.clone().requires_grad_(True)
    F.kl_div(torch.log_softmax(s2, -1), torch.log_softmax(teacher, -1), log_target=True,
             reduction="batchmean").backward()
    assert torch.isfinite(s1.grad).all()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-5)


def test_tail_kl_is_kl_of_the_coarsened_distributions(logits):
    teacher, student = logits
    k = 5
    ids, lp, tail = teacher_topk(teacher, k)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    p_s, q_s = p.gather(-1, ids), q.gather(-1, ids)
    p_c = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1)
    q_c = torch.cat([q_s, 1 - q_s.sum(-1, keepdim=True)], -1)
    expected = (p_c * (p_c.log() - q_c.log())).sum(-1).mean()
    assert losses.tail_kl(student, ids, lp, tail).item() == pytest.approx(expected.item(), rel=1e-5)


def test_student_tail_is_stable_when_topk_hold_nearly_all_mass():
    student = torch.full((1, V), -40.0)
    student[0, 0] = 40.0  # the top-1 holds all but ~e^-80 of the mass
    ids = torch.tensor([[0]])
    tail = losses.student_buckets(student, ids)[0, 1]
    expected = math.log(V - 1) - 80.0  # log((V-1) e^-40 / e^40), well inside float32 range
    assert tail.item() == pytest.approx(expected, rel=1e-4)  # 1 - Σq would give log(0) = -inf


def test_topk_kl_hand_computed():
    # Teacher top-2 probabilities 0.5, 0.25 (tail 0.25); renormalised over S: 2/3, 1/3.
    topk_logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ids = torch.tensor([[1, 3]])
    student = torch.tensor([[0.0, math.log(3.0), 5.0, 0.0]])  # gathered at S: logits log 3, 0 -> q = 3/4, 1/4
    p, q = [2 / 3, 1 / 3], [3 / 4, 1 / 4]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert losses.topk_kl(student, ids, topk_logprobs).item() == pytest.approx(expected, rel=1e-5)


def test_topk_kl_ignores_student_mass_outside_support():
    topk_logprobs = torch.log(torch.tensor([[0.6, 0.2]]))
    ids = torch.tensor([[0, 1]])
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 9.0, -3.0]])  # same logits on S, different elsewhere
    assert losses.topk_kl(a, ids, topk_logprobs).item() == pytest.approx(losses.topk_kl(b, ids, topk_logprobs).item())


def test_temperature_change_reweights_buckets():
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    tail = torch.log(torch.tensor([0.2]))
    buckets = losses.teacher_buckets(lp, tail, capture_temperature=1.0, temperature=2.0).exp()
    raw = torch.tensor([0.5, 0.3, 0.2]) ** 0.5
    torch.testing.assert_close(buckets[0], raw / raw.sum())


@pytest.mark.parametrize("fn", ["tail_kl", "topk_kl", "cross_entropy", "hidden_mse"])
def test_all_masked_is_zero(logits, fn):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, 4)
    mask = torch.zeros(N, dtype=torch.bool)
    student = student.clone().requires_grad_(True)
    if fn == "tail_kl":
        value = losses.tail_kl(student, ids, lp, tail, mask=mask)
    elif fn == "topk_kl":
        value = losses.topk_kl(student, ids, lp, mask=mask)
    elif fn == "cross_entropy":
        value = losses.cross_entropy(student, ids[:, 0], mask)
    else:
        value = losses.hidden_mse(student, teacher, mask)
    assert value.item() == 0.0
    value.backward()
    assert (student.grad == 0).all()


def test_mask_selects_positions(logits):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, 4)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[:3] = True
    masked = losses.tail_kl(student, ids, lp, tail, mask=mask)
    subset = losses.tail_kl(student[:3], ids[:3], lp[:3], tail[:3])
    assert masked.item() == pytest.approx(subset.item(), rel=1e-6)


def test_hidden_mse_matches_reference():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(N, 8, generator=g), torch.randn(N, 8, generator=g)
    assert losses.hidden_mse(a, b).item() == pytest.approx(F.mse_loss(a, b).item(), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_ce_and_tail_kl_equal_the_reference_values_and_gradients(logits, temperature):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, 6)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    labels[0] = ids[0, 0]  # a label inside the top-k, too
    ce_mask = torch.ones(N, dtype=torch.bool)
    ce_mask[-2:] = False
    kd_mask = torch.ones(N, dtype=torch.bool)
    kd_mask[3] = False
    a = student.clone().requires_grad_(True)
    ce, kd = losses.ce_and_tail_kl(a, labels, ce_mask, ids, lp, tail, temperature, kd_mask=kd_mask)
    (0.3 * ce + 0.7 * temperature**2 * kd).backward()
    b = student.clone().requires_grad_(True)
    ce_ref = losses.cross_entropy(b, labels, ce_mask)
    kd_ref = losses.tail_kl(b, ids, lp, tail, temperature, mask=kd_mask)
    (0.3 * ce_ref + 0.7 * temperature**2 * kd_ref).backward()
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-5)
    assert kd.item() == pytest.approx(kd_ref.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
