"""Distillation losses: pure functions on tensors (DESIGN §4).

Shapes: N positions (batch × time flattened), V vocabulary, K cached top-k entries, D hidden width.
Every loss averages over the positions where `mask` is true; with no such position it returns 0.
Teacher log-probs ℓ were cached at the capture temperature τc; losses take the train temperature τ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Stands in for log(0) where a finite value is needed: exp() of it is exactly 0 in float32 and
# 0 * it is 0, so empty buckets add nothing and produce no NaN gradients (unlike -inf).
LOG_ZERO = -1e30


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (N,) values over mask (N,) bool; 0 when nothing is selected."""
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None):
    """Hard-label CE. logits (N, V), labels (N,) int64."""
    return masked_mean(F.cross_entropy(logits.float(), labels, reduction="none"), mask)


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor,
                    capture_temperature: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """Teacher log-probs of the K+1 buckets (top-k ids, then the tail) at the train temperature.

    topk_logprobs (N, K), tail_logmass (N,) → (N, K+1), normalised. Changing temperature raises each
    bucket's probability to τc/τ and renormalises; for the tail this treats the leftover mass as one
    atom (exact only when the tail is empty or one token: see docs/FORMAT.md).
    """
    buckets = torch.cat([topk_logprobs, tail_logmass.unsqueeze(-1)], dim=-1).float()
    buckets = buckets.clamp(min=LOG_ZERO)
    return torch.log_softmax(buckets * (capture_temperature / temperature), dim=-1)


def student_buckets(student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float = 1.0):
    """Student log-probs over V gathered into the K+1 buckets: (N, V), (N, K) → (N, K+1).

    log q_tail = logsumexp(z/τ over ids not in the top-k) − logsumexp(z/τ): computed on the complement,
    never as log(1 − Σ q), which cancels catastrophically when the top-k hold almost all the mass.
    """
    scaled = student_logits.float() / temperature
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    topk = scaled.gather(-1, topk_ids) - log_norm
    complement = scaled.scatter(-1, topk_ids, LOG_ZERO)
    tail = torch.logsumexp(complement, dim=-1, keepdim=True) - log_norm
    return torch.cat([topk, tail.clamp(min=LOG_ZERO)], dim=-1)


def kl_from_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) per row; zero-probability teacher entries contribute exactly 0."""
    p = teacher_logprobs.exp()
    return (torch.special.xlogy(p, p) - p * student_logprobs).sum(-1)


def tail_kl(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature: float = 1.0,
            capture_temperature: float = 1.0, mask=None) -> torch.Tensor:
    """KL between the (K+1)-way coarsenings of teacher and student (the default KD loss).

    Equals the dense KL(p ‖ q) when K = V. student_logits (N, V); topk_* (N, K); tail_logmass (N,).
    """
    p = teacher_buckets(topk_logprobs, tail_logmass, capture_temperature, temperature)
    q = student_buckets(student_logits, topk_ids, temperature)
    if topk_ids.shape[-1] >= student_logits.shape[-1]:
        # K = V: the tail is empty on both sides; drop it rather than let the teacher's rounding
        # residue (~1e-7) meet the student's log(0).
        p, q = torch.log_softmax(p[..., :-1], -1), q[..., :-1]
    return masked_mean(kl_from_logprobs(p, q), mask)


def topk_kl(student_logits, topk_ids, topk_logprobs, temperature: float = 1.0,
            capture_temperature: float = 1.0, mask=None) -> torch.Tensor:
    """KL with both sides renormalised over the cached top-k ids.

    Teacher p_S / Σ p_S against softmax of the student's logits gathered at S (not the student's
    softmax over V, which would compare distributions with different normalisers).
    """
    p = torch.log_softmax(topk_logprobs.float() * (capture_temperature / temperature), dim=-1)
    q = torch.log_softmax(student_logits.float().gather(-1, topk_ids) / temperature, dim=-1)
    return masked_mean(kl_from_logprobs(p, q), mask)


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean squared error per position, averaged over the width: (N, D), (N, D) → scalar.

    The student side is already projected to the teacher's width (a learned nn.Linear in training).
    """
    return masked_mean((student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1), mask)
