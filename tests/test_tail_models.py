"""Tempering a cached tail (DESIGN §4, issue: KD at temperatures other than the capture's).

The reference is dense math in float64: the teacher's full distribution tempered, coarsened into the
K+1 buckets (top-k ids, tail) or kept whole.
"""

import math

import pytest
import torch

from pipeline import losses
from pipeline.data.tokens import TokenStore

V, K, N = 400, 16, 10


def dense_teacher(kind: str, seed: int = 0) -> torch.Tensor:
    """(N, V) float64 teacher log-probs: random logits, or a heavy (Zipf) tail over shuffled ids."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    probs = torch.arange(1, V + 1, dtype=torch.float64) ** -1.1
    logprobs = (probs / probs.sum()).log().expand(N, V)
    order = torch.stack([torch.randperm(V, generator=g) for _ in range(N)])
    return torch.empty(N, V, dtype=torch.float64).scatter(1, order, logprobs)


def cached(teacher: torch.Tensor, k: int):
    """What a capture stores: sorted top-k ids and log-probs, and the tail log-mass."""
    logprobs, ids = teacher.topk(k, -1)
    tail = torch.log(-torch.expm1(torch.logsumexp(logprobs, -1).clamp(max=0)))
    return ids, logprobs.float(), tail.float()


def true_bucket_kl(teacher, student_logits, ids, tau):
    """KL between the K+1-bucket coarsenings of the *exactly* tempered teacher and the student."""
    p = torch.softmax(teacher / tau, -1)
    q = torch.softmax(student_logits.double() / tau, -1)
    in_topk = torch.zeros_like(p, dtype=torch.bool).scatter(1, ids, True)
    p_b = torch.cat([p.gather(1, ids), (p * ~in_topk).sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q.gather(1, ids), (q * ~in_topk).sum(-1, keepdim=True)], -1)
    return (p_b * (p_b.log() - q_b.log())).sum(-1).mean()


@pytest.mark.parametrize("tail_model", losses.TAIL_MODELS)
@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0])
def test_every_tail_model_equals_the_dense_tempered_kl_at_full_support(tail_model, tau):
    teacher = dense_teacher("random")
    student = torch.randn(N, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids, lp, tail = cached(teacher, V)
    z = student.float().requires_grad_()
    sparse = losses.kd_loss("tail_kl", z, ids, lp, tail, tau, 1.0, tail_model=tail_model)
    sparse.backward()
    z_ref = student.clone().requires_grad_()
    p = torch.softmax(teacher / tau, -1)
    dense = (p * (p.log() - torch.log_softmax(z_ref / tau, -1))).sum(-1).mean()
    dense.backward()
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("tail_model", ["uniform", "power"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_at_the_capture_temperature_every_tail_model_is_the_one_atom_loss(tail_model, tau):
    teacher = dense_teacher("zipf")
    student = torch.randn(N, V, generator=torch.Generator().manual_seed(2))
    ids, lp, tail = cached(teacher, K)
    # τ = τc: the tail is the cached mass, whatever its shape (bit-identical to today's loss).
    for name in ("tail_kl", "tail_rkl", "tail_jsd", "tail_tv"):
        atom = losses.kd_loss(name, student, ids, lp, tail, tau, tau, tail_model="atom")
        other = losses.kd_loss(name, student, ids, lp, tail, tau, tau, tail_model=tail_model)
        assert other.item() == atom.item(), name


@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_completed_tails_are_less_biased_than_one_atom_on_a_heavy_tail(tau):
    teacher = dense_teacher("zipf")
    student = torch.randn(N, V, generator=torch.Generator().manual_seed(3)) * 2
    ids, lp, tail = cached(teacher, K)
    true_tail = torch.logsumexp(teacher.scatter(1, ids, -math.inf) / tau, -1)  # log Σ_tail p^(1/τ)
    reference = true_bucket_kl(teacher, student, ids, tau).item()
    errors, mass_errors = {}, {}
    for model in losses.TAIL_MODELS:
        mass_errors[model] = (losses.tempered_tail(lp, tail, 1 / tau, model, V).double() - true_tail).abs().mean()
        errors[model] = abs(losses.kd_loss("tail_kl", student, ids, lp, tail, tau, 1.0, tail_model=model).item()
                            - reference)
    assert errors["power"] < errors["uniform"] < errors["atom"], errors
    assert mass_errors["power"] < mass_errors["uniform"] < mass_errors["atom"], mass_errors
    assert mass_errors["atom"] > 1.0  # nats: the one-atom tail is far too small at τ > τc
    assert errors["power"] < 0.01 * errors["atom"]


def test_uniform_tail_is_the_maximum_entropy_completion():
    """m^(1−r)·P^r: the tempered mass of P spread evenly over m ids, checked by brute force."""
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    tail = torch.log(torch.tensor([0.2]))
    vocab, ratio = 10, 0.5
    got = losses.tempered_tail(lp, tail, ratio, "uniform", vocab)
    expected = math.log(8 * (0.2 / 8) ** ratio)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_power_tail_conserves_the_cached_mass_and_continues_the_last_log_prob():
    """At ratio 1 the fitted decay sums to the cached tail mass; a tail the top-k entries cannot
    continue (heavier than p_K on every missing id, only possible after lossy rounding) falls back to
    the uniform completion."""
    lp = torch.log(torch.tensor([[0.4, 0.2, 0.1], [0.9, 0.05, 0.001]]))
    tail = torch.log1p(-lp.exp().sum(-1))
    decay_sum = {}
    for row in range(2):
        # Brute force: find a by bisection on the exact sum, then compare the tempered sums.
        n = torch.arange(4, 5001, dtype=torch.float64)
        lo, hi = 0.0, 1e4
        for _ in range(200):
            mid = (lo + hi) / 2
            total = (lp[row, -1].double().exp() * (n / 3) ** -mid).sum()
            lo, hi = (mid, hi) if total > tail[row].double().exp() else (lo, mid)
        decay_sum[row] = (lp[row, -1].double().exp() * (n / 3) ** -lo) ** 0.5
    got = losses.tempered_tail(lp, tail, 0.5, "power", 5003)
    for row in range(2):
        assert got[row].item() == pytest.approx(math.log(decay_sum[row].sum().item()), abs=0.01)
    impossible = losses.tempered_tail(torch.log(torch.tensor([[0.5, 0.001]])), torch.log(torch.tensor([0.499])),
                                      0.5, "power", 10)
    assert impossible.item() == pytest.approx(losses.tempered_tail(
        torch.log(torch.tensor([[0.5, 0.001]])), torch.log(torch.tensor([0.499])), 0.5, "uniform", 10).item())


@pytest.mark.parametrize("tail_model", losses.TAIL_MODELS)
def test_fused_loss_tempers_the_tail_like_the_reference(tail_model):
    teacher = dense_teacher("zipf")
    student = torch.randn(N, V, generator=torch.Generator().manual_seed(4))
    ids, lp, tail = cached(teacher, K)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))
    a, b = student.clone().requires_grad_(), student.clone().requires_grad_()
    ce, kd = losses.ce_and_tail_kl(a, labels, None, ids, lp, tail, 3.0, 1.0, tail_model=tail_model)
    (ce + kd).backward()
    ref_kd = losses.kd_loss("tail_kl", b, ids, lp, tail, 3.0, 1.0, tail_model=tail_model)
    (losses.cross_entropy(b, labels) + ref_kd).backward()
    assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_the_default_temperature_is_the_store_capture_temperature(tiny_tokens):
    from pipeline.config import StudentConfig
    from pipeline.student.setup import make_objective

    tokens = TokenStore(tiny_tokens.path)
    assert StudentConfig().temperature == 0.0  # "the capture's", resolved per store
    assert make_objective(StudentConfig(), tokens, True, capture_temperature=2.0).temperature == 2.0
    assert make_objective(StudentConfig(), tokens, True).temperature == 1.0  # no store: tau 1
    assert make_objective(StudentConfig(temperature=4.0), tokens, True, capture_temperature=2.0).temperature == 4.0
