"""Fused CE + sampled KD and CE + top-k/sampled-tail KD against the unfused reference functions:
values and gradients, with masked positions, padding slots (id 0, count 0) and positions without draws."""

import pytest
import torch

from pipeline import losses
from pipeline.teacher.signals import sample_targets, trim_top_p
from pipeline.training.objective import Objective
from pipeline.targets import format as fmt

N, V, S, K = 14, 40, 6, 5


def case(seed=0):
    """Student logits (N, V), labels, a CE mask, and teacher log-probs (N, V)."""
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(N, V, generator=g) * 3, torch.randn(N, V, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    ce_mask = torch.ones(N, dtype=torch.bool)
    ce_mask[-3:] = False
    return student, labels, ce_mask, torch.log_softmax(teacher, -1), g


def sampled(teacher_logprobs, g):
    """sample_targets' ids and counts, with the edge cases a store holds: padding id 0 beside a drawn
    id 0, a position without draws, and a one-hot position."""
    ids, counts = sample_targets(teacher_logprobs, S, g)
    ids[0], counts[0] = torch.tensor([0, 3, 7, 0, 0, 0]), torch.tensor([2, 3, 1, 0, 0, 0])
    ids[1], counts[1] = 0, 0
    ids[2], counts[2] = torch.tensor([9, 0, 0, 0, 0, 0]), torch.tensor([S, 0, 0, 0, 0, 0])
    return ids, counts


def assert_equal_with_gradients(fused, reference, student, weights=(0.3, 0.7)):
    """fused and reference map logits (N, V) to (CE, KD); compare values and d(w·(CE, KD))/dlogits."""
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    got, want = fused(a), reference(b)
    (weights[0] * got[0] + weights[1] * got[1]).backward()
    (weights[0] * want[0] + weights[1] * want[1]).backward()
    for x, y in zip(got, want):
        assert x.item() == pytest.approx(y.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_kd_mask", [False, True])
def test_fused_sampled_kd_equals_the_reference(temperature, with_kd_mask):
    student, labels, ce_mask, teacher, g = case()
    ids, counts = sampled(teacher, g)
    kd_mask = None
    if with_kd_mask:
        kd_mask = torch.ones(N, dtype=torch.bool)
        kd_mask[[2, 5]] = False
    assert_equal_with_gradients(
        lambda z: losses.ce_and_sampled_kd(z, labels, ce_mask, ids, counts, temperature, kd_mask),
        lambda z: (losses.cross_entropy(z, labels, ce_mask), losses.sampled_kd(z, ids, counts, temperature, kd_mask)),
        student)


def test_fused_sampled_kd_without_any_draw_is_ce_alone():
    student, labels, ce_mask, _, _ = case(1)
    ids, counts = torch.zeros(N, S, dtype=torch.int64), torch.zeros(N, S, dtype=torch.int64)
    a = student.clone().requires_grad_(True)
    ce, kd = losses.ce_and_sampled_kd(a, labels, ce_mask, ids, counts)
    assert kd.item() == 0.0
    kd.backward(retain_graph=True)
    assert (a.grad == 0).all()
    assert ce.item() == pytest.approx(losses.cross_entropy(student, labels, ce_mask).item(), rel=1e-6)


def test_fused_sampled_kd_ignores_minus_inf_logits_at_padding_slots():
    student, labels, ce_mask, teacher, g = case(2)
    ids, counts = sampled(teacher, g)
    student[1, 0] = float("-inf")  # position 1 has no draws; its padding slots point at id 0
    labels[1] = 5
    a = student.clone().requires_grad_(True)
    ce, kd = losses.ce_and_sampled_kd(a, labels, ce_mask, ids, counts)
    (ce + kd).backward()
    assert torch.isfinite(kd) and torch.isfinite(a.grad).all()


def topk_sampled_targets(teacher, g, top_p=1.0):
    topk_logprobs, topk_ids = teacher.topk(K, dim=-1)
    topk_ids, topk_logprobs, _ = trim_top_p(topk_ids, topk_logprobs, top_p)
    kept = torch.logsumexp(topk_logprobs, -1).clamp(max=0)
    ids, counts = sampled(teacher, g)
    # Draws inside the top-k are no tail draws; a position's drawn ids are distinct (as stored).
    outside = next(i for i in range(V) if i not in topk_ids[3])
    ids[3] = torch.tensor([*topk_ids[3, :2].tolist(), outside, 0, 0, 0])
    counts[3] = torch.tensor([1, 1, S - 2, 0, 0, 0])
    return topk_ids, topk_logprobs, torch.log(-torch.expm1(kept)), ids, counts


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_p", [1.0, 0.6])  # 0.6: trimmed (absent) top-k entries
def test_fused_topk_sampled_kd_equals_the_reference(temperature, top_p):
    student, labels, ce_mask, teacher, g = case(3)
    targets = topk_sampled_targets(teacher, g, top_p)
    assert_equal_with_gradients(
        lambda z: losses.ce_and_topk_sampled_kd(z, labels, ce_mask, *targets, temperature),
        lambda z: (losses.cross_entropy(z, labels, ce_mask), losses.topk_sampled_kd(z, *targets, temperature)),
        student)


@pytest.mark.parametrize("kd_signal", ["sampled", "topk_sampled"])
def test_the_objective_takes_the_fused_path_and_it_equals_the_unfused_one(kd_signal, monkeypatch):
    student, labels, ce_mask, teacher, g = case(4)
    topk_ids, topk_logprobs, tail, ids, counts = topk_sampled_targets(teacher, g)
    targets = {fmt.TOPK_IDS: topk_ids, fmt.TOPK_LOGPROBS: topk_logprobs, fmt.TAIL_LOGMASS: tail,
               fmt.SAMPLED_IDS: ids, fmt.SAMPLED_COUNTS: counts}
    name = {"sampled": "ce_and_sampled_kd", "topk_sampled": "ce_and_topk_sampled_kd"}[kd_signal]
    fused, calls = getattr(losses, name), []
    monkeypatch.setattr(losses, name, lambda *args: calls.append(1) or fused(*args))
    one = Objective(V, alpha=0.5, kd_signal=kd_signal)
    # Two teachers (the same one, weights 1 and 0) take the unfused path: the same loss.
    two = Objective(V, alpha=0.5, kd_signal=kd_signal, teacher_weights=(1.0, 0.0))
    twice = {**targets, **{fmt.teacher_key(key, 1): value for key, value in targets.items()}}
    assert_equal_with_gradients(
        lambda z: tuple(one.logit_losses(z, labels, ce_mask, targets, 1.0).values()),
        lambda z: tuple(two.logit_losses(z, labels, ce_mask, twice, 1.0).values()), student)
    assert len(calls) == 1
