"""Sparse KD losses against dense reference math (DESIGN §4)."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import losses
from pipeline.errors import KdcacheError

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
    assert losses.kd_loss("topk_kl", student, ids, topk_logprobs, None).item() == pytest.approx(expected, rel=1e-5)


def test_topk_kl_ignores_student_mass_outside_support():
    topk_logprobs = torch.log(torch.tensor([[0.6, 0.2]]))
    ids = torch.tensor([[0, 1]])
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 9.0, -3.0]])  # same logits on S, different elsewhere
    assert losses.kd_loss("topk_kl", a, ids, topk_logprobs, None).item() == pytest.approx(losses.kd_loss("topk_kl", b, ids, topk_logprobs, None).item())


def test_temperature_change_reweights_buckets():
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    tail = torch.log(torch.tensor([0.2]))
    buckets = losses.teacher_buckets(lp, tail, capture_temperature=1.0, temperature=2.0).exp()
    raw = torch.tensor([0.5, 0.3, 0.2]) ** 0.5
    torch.testing.assert_close(buckets[0], raw / raw.sum())


@pytest.mark.parametrize("fn", ["tail_kl", "topk_kl", "cross_entropy", "hidden_mse", "hidden_relative_mse"])
def test_all_masked_is_zero(logits, fn):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, 4)
    mask = torch.zeros(N, dtype=torch.bool)
    student = student.clone().requires_grad_(True)
    if fn == "tail_kl":
        value = losses.tail_kl(student, ids, lp, tail, mask=mask)
    elif fn == "topk_kl":
        value = losses.kd_loss("topk_kl", student, ids, lp, None, mask=mask)
    elif fn == "cross_entropy":
        value = losses.cross_entropy(student, ids[:, 0], mask)
    else:
        value = getattr(losses, fn)(student, teacher, mask)
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


def test_hidden_relative_mse_is_the_mse_over_the_teachers_variance_and_scale_free():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(N, 8, generator=g), 3 + 5 * torch.randn(N, 8, generator=g)
    reference = F.mse_loss(student, teacher) / teacher.var(0, unbiased=False).mean()
    relative = losses.hidden_relative_mse(student, teacher)
    assert relative.item() == pytest.approx(reference.item(), rel=1e-6)
    # A teacher 1 000 × larger (a pretrained LM's residual stream) and a student that keeps up: the same value.
    assert losses.hidden_relative_mse(1000 * student, 1000 * teacher).item() == pytest.approx(relative.item(), rel=1e-5)
    # Predicting the teacher's mean state scores 1; the teacher itself 0.
    mean_state = teacher.mean(0).expand_as(teacher)
    assert losses.hidden_relative_mse(mean_state, teacher).item() == pytest.approx(1.0, rel=1e-6)
    assert losses.hidden_relative_mse(teacher, teacher).item() == 0.0
    # A mask keeps positions out of the variance as well as the error.
    mask = torch.zeros(N, dtype=torch.bool)
    mask[:5] = True
    assert losses.hidden_relative_mse(student, teacher, mask).item() == pytest.approx(
        losses.hidden_relative_mse(student[:5], teacher[:5]).item(), rel=1e-6)


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


# --- Reverse KL, JSD, total variation, hidden cosine, the registry ---------------------------------
# References below work on probabilities (N, B) with plain torch ops, independent of pipeline.losses.

def dense_kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def dense_jsd(p, q, mixing=0.5):
    m = mixing * p + (1 - mixing) * q
    return mixing * dense_kl(p, m) + (1 - mixing) * dense_kl(q, m)


DENSE = {
    "kl": dense_kl,
    "rkl": lambda p, q: dense_kl(q, p),
    "jsd": dense_jsd,
    "tv": lambda p, q: 0.5 * (p - q).abs().sum(-1),
}
KINDS = list(DENSE)


def dense_reference(kind, teacher, student, temperature):
    """Dense divergence of softmax(teacher/τ) and softmax(student/τ); forward KL through F.kl_div."""
    if kind == "kl":
        return F.kl_div(torch.log_softmax(student / temperature, -1), torch.log_softmax(teacher / temperature, -1),
                        log_target=True, reduction="batchmean")
    p, q = torch.softmax(teacher / temperature, -1), torch.softmax(student / temperature, -1)
    return DENSE[kind](p, q).mean()


def test_registry_names_every_kd_loss():
    assert set(losses.KD_LOSS_FUNCTIONS) == {f"{support}_{kind}" for support in ("tail", "topk") for kind in KINDS}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_tail_losses_with_full_support_equal_dense_values_and_gradients(logits, kind, temperature):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher / temperature, V)  # K = V: the tail is empty
    a = student.clone().requires_grad_(True)
    sparse = losses.KD_LOSS_FUNCTIONS[f"tail_{kind}"](a, ids, lp, tail, temperature=temperature,
                                                      capture_temperature=temperature)
    sparse.backward()
    b = student.clone().requires_grad_(True)
    dense = dense_reference(kind, teacher, b, temperature)
    dense.backward()
    assert sparse.item() == pytest.approx(dense.item(), abs=1e-6)
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_tail_losses_are_divergences_of_the_coarsened_distributions(logits, kind):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, 5)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    p_s, q_s = p.gather(-1, ids), q.gather(-1, ids)
    p_c = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1)
    q_c = torch.cat([q_s, 1 - q_s.sum(-1, keepdim=True)], -1)
    expected = DENSE[kind](p_c, q_c).mean()
    value = losses.KD_LOSS_FUNCTIONS[f"tail_{kind}"](student, ids, lp, tail)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def test_tail_jsd_with_other_mixing_equals_dense(logits):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, V)
    expected = dense_jsd(torch.softmax(teacher, -1), torch.softmax(student, -1), 0.2).mean()
    assert losses.kd_loss("tail_jsd", student, ids, lp, tail, mixing=0.2).item() == pytest.approx(expected.item(), abs=1e-6)


def test_topk_losses_hand_computed():
    # The case of test_topk_kl_hand_computed: renormalised over S, teacher 2/3, 1/3; student 3/4, 1/4.
    topk_logprobs = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ids = torch.tensor([[1, 3]])
    student = torch.tensor([[0.0, math.log(3.0), 5.0, 0.0]])
    tail = torch.tensor([math.log(0.25)])
    p, q = [2 / 3, 1 / 3], [3 / 4, 1 / 4]
    m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
    expected = {
        "kl": sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)),
        "rkl": sum(qi * math.log(qi / pi) for pi, qi in zip(p, q)),
        "jsd": 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m))
        + 0.5 * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m)),
        "tv": 0.5 * (abs(2 / 3 - 3 / 4) + abs(1 / 3 - 1 / 4)),  # 1/12
    }
    for kind, value in expected.items():
        got = losses.KD_LOSS_FUNCTIONS[f"topk_{kind}"](student, ids, topk_logprobs, tail).item()
        assert got == pytest.approx(value, rel=1e-5), kind


@pytest.mark.parametrize("kind", ["rkl", "jsd", "tv"])
def test_topk_losses_ignore_student_mass_outside_support(kind):
    topk_logprobs = torch.log(torch.tensor([[0.6, 0.2]]))
    ids = torch.tensor([[0, 1]])
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 9.0, -3.0]])
    fn = losses.KD_LOSS_FUNCTIONS[f"topk_{kind}"]
    assert fn(a, ids, topk_logprobs).item() == pytest.approx(fn(b, ids, topk_logprobs).item())


@pytest.mark.parametrize("name", sorted(losses.KD_LOSS_FUNCTIONS))
def test_every_registry_loss_is_zero_with_zero_gradient_when_all_masked(logits, name):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, 4)
    student = student.clone().requires_grad_(True)
    value = losses.KD_LOSS_FUNCTIONS[name](student, ids, lp, tail, mask=torch.zeros(N, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()
    assert (student.grad == 0).all()


@pytest.mark.parametrize("k", [4, V])
@pytest.mark.parametrize("name", sorted(losses.KD_LOSS_FUNCTIONS))
def test_no_nan_when_teacher_has_empty_buckets(logits, name, k):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, k)
    lp = lp.clone()
    lp[:, -1] = -math.inf  # an empty top-k bucket
    tail = torch.full_like(tail, -math.inf)  # and an empty tail: the top-k hold all the mass
    for temperature in (1.0, 2.0):
        a = student.clone().requires_grad_(True)
        value = losses.KD_LOSS_FUNCTIONS[name](a, ids, lp, tail, temperature=temperature)
        value.backward()
        assert torch.isfinite(value), (name, temperature)
        assert torch.isfinite(a.grad).all(), (name, temperature)


def test_no_nan_when_student_puts_no_mass_outside_the_topk():
    student = torch.full((2, V), -200.0, requires_grad=True)  # the student's tail underflows to 0
    ids = torch.arange(3).expand(2, 3)
    with torch.no_grad():
        student[:, :3] = 0.0
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.1]])).expand(2, 3)
    tail = torch.log(torch.tensor([0.1, 0.1]))
    for name, fn in losses.KD_LOSS_FUNCTIONS.items():
        student.grad = None
        fn(student, ids, lp, tail).backward()
        assert torch.isfinite(student.grad).all(), name


def test_reverse_kl_penalises_student_mass_in_an_empty_teacher_bucket():
    lp = torch.log(torch.tensor([[0.7, 0.3]]))
    tail = torch.tensor([-math.inf])
    ids = torch.tensor([[0, 1]])
    concentrated = torch.tensor([[math.log(0.7), math.log(0.3), -50.0, -50.0]])
    spread = torch.tensor([[math.log(0.7), math.log(0.3), 0.0, 0.0]])
    assert losses.kd_loss("tail_rkl", concentrated, ids, lp, tail).item() == pytest.approx(0.0, abs=1e-5)
    assert losses.kd_loss("tail_rkl", spread, ids, lp, tail).item() > 10.0  # large and finite, not 1e30-scale
    assert losses.kd_loss("tail_rkl", spread, ids, lp, tail).item() < 100.0


def test_jsd_is_symmetric_at_one_half_and_mirrors_mixing():
    g = torch.Generator().manual_seed(3)
    a = torch.log_softmax(torch.randn(N, 7, generator=g) * 2, -1)
    b = torch.log_softmax(torch.randn(N, 7, generator=g) * 2, -1)
    torch.testing.assert_close(losses.jsd_from_logprobs(a, b, 0.5), losses.jsd_from_logprobs(b, a, 0.5))
    torch.testing.assert_close(losses.jsd_from_logprobs(a, b, 0.2), losses.jsd_from_logprobs(b, a, 0.8))
    assert not torch.allclose(losses.jsd_from_logprobs(a, b, 0.2), losses.jsd_from_logprobs(b, a, 0.2))
    assert (losses.jsd_from_logprobs(a, b, 0.5) <= math.log(2) + 1e-6).all()


@pytest.mark.parametrize("mixing", [0.1, 0.5, 0.9])
def test_jsd_is_zero_when_teacher_and_student_agree(logits, mixing):
    teacher, _ = logits
    ids, lp, tail = teacher_topk(teacher, 6)
    assert losses.kd_loss("tail_jsd", teacher, ids, lp, tail, mixing=mixing).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.kd_loss("topk_jsd", teacher, ids, lp, None, mixing=mixing).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mixing", [0.0, 1.0, -0.5, 2.0])
def test_jsd_rejects_mixing_outside_the_open_interval(logits, mixing):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, 4)
    with pytest.raises(KdcacheError, match="mixing"):
        losses.kd_loss("tail_jsd", student, ids, lp, tail, mixing=mixing)


def test_registry_jsd_takes_mixing_by_partial(logits):
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, 4)
    direct = {"tail_jsd": losses.kd_loss("tail_jsd", student, ids, lp, tail, mixing=0.2),
              "topk_jsd": losses.kd_loss("topk_jsd", student, ids, lp, None, mixing=0.2)}
    for name, expected in direct.items():
        registered = losses.KD_LOSS_FUNCTIONS[name]
        value = functools.partial(registered, mixing=0.2)(student, ids, lp, tail)
        assert value.item() == pytest.approx(expected.item())
        assert value.item() != pytest.approx(registered(student, ids, lp, tail).item())  # mixing took effect


def test_hidden_cosine_matches_reference_and_extremes():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(N, 8, generator=g), torch.randn(N, 8, generator=g)
    expected = (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()
    assert losses.hidden_cosine(a, b).item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses.hidden_cosine(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.hidden_cosine(a, -a).item() == pytest.approx(2.0, abs=1e-6)


def test_hidden_cosine_all_masked_is_zero():
    a = torch.randn(N, 8, requires_grad=True)
    value = losses.hidden_cosine(a, torch.randn(N, 8), torch.zeros(N, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()
    assert (a.grad == 0).all()


def test_no_nan_when_student_logits_hold_minus_inf(logits):
    # Padded vocabularies carry -inf logits; one here also sits on a cached top-k id.
    teacher, student = logits
    ids, lp, tail = teacher_topk(teacher, 4)
    student = student.clone()
    student[:, -3:] = -math.inf
    student[0, ids[0, 1]] = -math.inf
    for name in ("tail_rkl", "topk_rkl", "tail_jsd", "topk_jsd", "tail_tv", "topk_tv"):
        a = student.clone().requires_grad_(True)
        value = losses.KD_LOSS_FUNCTIONS[name](a, ids, lp, tail)
        value.backward()
        assert torch.isfinite(value), name
        assert torch.isfinite(a.grad).all(), name
