"""KD losses on cached top-k targets: a support (buckets) composed with a divergence (DESIGN §4).

A loss is named SUPPORT_DIVERGENCE: `tail_kl` is the KL on the K+1 tail buckets (the default, exact
when K = V), `topk_rkl` the reverse KL with both sides renormalised over the top-k ids, and so on
for every pair in SUPPORTS × DIVERGENCES. Every loss averages over the positions where `mask` is
true; with no such position it returns 0. Shapes as in buckets.py; a divergence takes teacher
log-probs p and student log-probs q over the same B buckets, (N, B) → (N,). Inputs may hold −inf;
they are clamped to LOG_ZERO so that empty buckets contribute exactly 0 to values and gradients.
"""

from __future__ import annotations

import functools
import math

import torch

from pipeline.errors import KdcacheError
from pipeline.losses.buckets import LOG_ZERO, SUPPORTS, masked_mean


def kl_from_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) per row; zero-probability teacher entries contribute exactly 0."""
    p = teacher_logprobs.exp()
    return (torch.special.xlogy(p, p) - p * student_logprobs).sum(-1)


# Reverse KL is +inf where the teacher has an empty bucket the student does not. The teacher side is
# floored at the log of float32's smallest normal number: a large, finite penalty (~87 nats per unit of
# student mass) that still pushes mass out of the bucket, instead of LOG_ZERO's 1e30-scale gradients.
RKL_TEACHER_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) per row: (N, B), (N, B) → (N,), differentiable in both arguments.

    Written as p · (difference of finite logs), not xlogy(p, p): xlogy's gradient in its second
    argument is p / p, which is NaN wherever a differentiated p is 0.
    """
    log_p, log_q = log_p.clamp(min=LOG_ZERO), log_q.clamp(min=LOG_ZERO)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def reverse_kl_from_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor):
    """KL(q ‖ p) per row: (N, B), (N, B) → (N,). Teacher-empty buckets cost RKL_TEACHER_LOG_FLOOR."""
    return _kl_terms(student_logprobs, teacher_logprobs.clamp(min=RKL_TEACHER_LOG_FLOOR))


def jsd_from_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mixing: float = 0.5):
    """Generalised JSD per row: π KL(p ‖ m) + (1 − π) KL(q ‖ m), m = π p + (1 − π) q, π = `mixing`.
    (N, B) → (N,).

    log m comes from a logsumexp over the two weighted logs, so no probability is ever subtracted and
    m > 0 wherever either side is: the value is finite (≤ log 2 at π = 0.5) even with empty buckets.
    """
    if not 0.0 < mixing < 1.0:
        raise KdcacheError(f"JSD mixing weight must lie strictly between 0 and 1, got {mixing}.")
    log_p, log_q = teacher_logprobs.clamp(min=LOG_ZERO), student_logprobs.clamp(min=LOG_ZERO)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(mixing), log_q + math.log1p(-mixing)]), dim=0)
    return mixing * _kl_terms(log_p, log_m) + (1.0 - mixing) * _kl_terms(log_q, log_m)


def tv_from_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Total variation ½ Σ |p − q| per row: (N, B), (N, B) → (N,), in [0, 1]."""
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


DIVERGENCES = {"kl": kl_from_logprobs, "rkl": reverse_kl_from_logprobs, "jsd": jsd_from_logprobs,
               "tv": tv_from_logprobs}
# Every KD loss name, support first: tail_kl, tail_rkl, ..., topk_tv.
KD_LOSSES = tuple(f"{support}_{kind}" for support in SUPPORTS for kind in DIVERGENCES)


def split_loss_name(name: str) -> tuple[str, str]:
    """"tail_kl" → ("tail", "kl"), refusing names that are not SUPPORT_DIVERGENCE."""
    support, _, kind = name.partition("_")
    if support not in SUPPORTS or kind not in DIVERGENCES:
        raise KdcacheError(f"unknown KD loss {name!r}; choose one of {', '.join(KD_LOSSES)}.")
    return support, kind


def kd_loss(name: str, student_logits, topk_ids, topk_logprobs, tail_logmass=None, temperature: float = 1.0,
            capture_temperature: float = 1.0, mask=None, tail_model: str = "atom", **options) -> torch.Tensor:
    """The KD loss `name` (SUPPORT_DIVERGENCE) for cached targets; scalar.

    student_logits (N, V); topk_ids, topk_logprobs (N, K); tail_logmass (N,) (unused by topk_*);
    mask (N,) bool or None. tail_model: how a tempered tail is completed (buckets.TAIL_MODELS).
    options: the divergence's own (JSD's `mixing`).
    """
    support, kind = split_loss_name(name)
    p, q = SUPPORTS[support](student_logits, topk_ids, topk_logprobs, tail_logmass, temperature,
                             capture_temperature, tail_model)
    return masked_mean(DIVERGENCES[kind](p, q, **options), mask)


# Every KD loss by name, with kd_loss's signature less the name.
KD_LOSS_FUNCTIONS = {name: functools.partial(kd_loss, name) for name in KD_LOSSES}
tail_kl = KD_LOSS_FUNCTIONS["tail_kl"]  # the default, and the reference the fused loss is tested against
