"""Supports: teacher and student log-probs over the same buckets, ready for a divergence (DESIGN §4).

Shapes: N positions (batch × positions flattened), V vocabulary, K cached top-k entries.
Teacher log-probs ℓ were cached at the capture temperature τc; losses take the train temperature τ.
Teacher top-k entries with log-prob −inf are absent (trimmed by top-p; their id is padding): every
support gives them exactly zero weight, on both sides, and their ids stay in the student's tail.
A position's first entry is always present.

Two supports:
- tail: K+1 buckets, the top-k ids and the tail (everything else). Exact at K = V.
- topk: K buckets, both sides renormalised over the top-k ids.

Temperature on a cache. Changing τ raises each teacher probability to r = τc/τ and renormalises.
For a top-k id that is exact; for the tail it needs Σ_{j ∉ S} p_j^r over ids whose probabilities
were not kept, so the tail's shape must be modelled (TAIL_MODELS). At τ = τc every model gives the
cached tail mass, and with an empty tail (K = V) there is nothing to model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Stands in for log(0) where a finite value is needed: exp() of it is exactly 0 in float32 and
# 0 * it is 0, so empty buckets add nothing and produce no NaN gradients (unlike -inf).
LOG_ZERO = -1e30

# How the teacher's tail is completed when the train temperature differs from the capture's:
#   atom:    the tail is one id holding all its mass (Σ p_j^r = P^r): the smallest tempered tail
#            possible, too small by far for a large vocabulary at τ > τc.
#   uniform: the maximum-entropy completion, P spread evenly over the m = V − K ids (m^(1−r) P^r):
#            the largest tempered tail possible for τ > τc.
#   power:   a decay continuing the cached ranking: p at rank n > K is p_K (n/K)^(−a), with a ≥ 0
#            fitted per position so the tail's ids sum to P (continuous with the last cached
#            log-prob, mass conserved). Heavy-tailed LM distributions look like this.
TAIL_MODELS = ("uniform", "power", "atom")


def masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (N,) values over mask (N,) bool; 0 when nothing is selected."""
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None):
    """Hard-label CE. logits (N, V), labels (N,) int64."""
    return masked_mean(F.cross_entropy(logits.float(), labels, reduction="none"), mask)


EXACT_TERMS = 64  # ranks K+1 .. K+64 are summed term by term, the rest as an integral


def _log_integral(s: torch.Tensor, k: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log of k ∫ x^(−s) dx from lower/k to upper/k (upper > lower > 0), stable for every s ≥ 0."""
    log_a, log_b = torch.log(lower / k), torch.log(upper / k)
    u, width = 1.0 - s, log_b - log_a  # ∫ x^(u−1) dx = (b^u − a^u)/u = a^u (e^{u·width} − 1)/u
    x = u * width
    small = x.abs() < 1e-4
    safe_x = torch.where(small, torch.ones_like(x), x)
    # log((e^x − 1)/x) for x > 0 and x < 0 without overflow; its series near 0.
    log_ratio = torch.where(safe_x > 0, safe_x + torch.log(-torch.expm1(-safe_x)) - torch.log(safe_x),
                            torch.log(-torch.expm1(safe_x)) - torch.log(-safe_x))
    log_ratio = torch.where(small, x / 2, log_ratio)
    return torch.log(k) + u * log_a + torch.log(width) + log_ratio


def _log_rank_sum(s: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """log Σ_{n=k+1}^{v} (n/k)^(−s), elementwise: the first EXACT_TERMS ranks term by term, the rest by
    the midpoint integral k ∫ x^(−s) dx from (k+E+½)/k to (v+½)/k (accurate there: the terms vary slowly)."""
    j = torch.arange(1, EXACT_TERMS + 1, dtype=s.dtype, device=s.device)  # (E,)
    ranks = k.unsqueeze(-1) + j  # (..., E)
    terms = -s.unsqueeze(-1) * torch.log(ranks / k.unsqueeze(-1))
    terms = terms.masked_fill(ranks > v.unsqueeze(-1), -torch.inf)
    head = torch.logsumexp(terms, -1)
    lower = k + EXACT_TERMS + 0.5
    has_rest = v > k + EXACT_TERMS
    rest = _log_integral(s, k, lower, torch.where(has_rest, v + 0.5, lower + 1.0))
    return torch.where(has_rest, torch.logaddexp(head, rest), head)


def tempered_tail(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, ratio: float,
                  tail_model: str = "atom", vocab_size: int | None = None) -> torch.Tensor:
    """log Σ_{j ∉ S} p_j^ratio over the teacher's tail under `tail_model`: (N, K), (N,) → (N,).

    ratio = τc/τ. At ratio 1 every model returns the cached tail_logmass (clamped to LOG_ZERO).
    """
    log_tail = tail_logmass.float().clamp(min=LOG_ZERO)
    if ratio == 1.0 or tail_model == "atom":
        return ratio * log_tail
    if vocab_size is None:
        raise ValueError(f"the {tail_model} tail model needs the vocabulary size.")
    logprobs = topk_logprobs.float()
    present = logprobs > LOG_ZERO
    kept = present.sum(-1).float()
    missing = (vocab_size - kept).clamp(min=1.0)  # m, ids in the tail
    empty = (log_tail <= LOG_ZERO) | (kept >= vocab_size)
    uniform = ratio * log_tail + (1.0 - ratio) * torch.log(missing)
    if tail_model == "uniform":
        return torch.where(empty, LOG_ZERO, uniform)
    # power: solve log p_K + log S(a) = log P for a ≥ 0 by bisection (S decreases in a).
    log_last = torch.where(present, logprobs, torch.inf).amin(-1)  # the smallest kept log-prob
    k, v = kept.clamp(min=1.0), torch.full_like(kept, float(vocab_size)).clamp(min=kept + 1.0)
    target = log_tail - log_last
    low, high = torch.zeros_like(log_tail), torch.full_like(log_tail, 1e4)
    for _ in range(48):
        mid = (low + high) / 2
        too_much = _log_rank_sum(mid, k, v) > target
        low, high = torch.where(too_much, mid, low), torch.where(too_much, high, mid)
    decay = (low + high) / 2
    power = ratio * log_last + _log_rank_sum(decay * ratio, k, v)
    # A tail heavier than p_K on every missing id (possible only after lossy rounding) cannot decay:
    # spread it evenly instead.
    feasible = _log_rank_sum(torch.zeros_like(decay), k, v) >= target
    return torch.where(empty, LOG_ZERO, torch.where(feasible, power, uniform))


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor,
                    capture_temperature: float = 1.0, temperature: float = 1.0,
                    tail_model: str = "atom", vocab_size: int | None = None) -> torch.Tensor:
    """Teacher log-probs of the K+1 buckets (top-k ids, then the tail) at the train temperature.

    topk_logprobs (N, K), tail_logmass (N,) → (N, K+1), normalised. Each top-k probability is raised
    to τc/τ; the tail becomes `tempered_tail` under `tail_model` (see TAIL_MODELS); then all renormalise.
    """
    ratio = capture_temperature / temperature
    topk = topk_logprobs.float().clamp(min=LOG_ZERO) * ratio
    tail = tempered_tail(topk_logprobs, tail_logmass, ratio, tail_model, vocab_size)
    return torch.log_softmax(torch.cat([topk, tail.unsqueeze(-1)], dim=-1), dim=-1)


def present_ids(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor):
    """(N, K) ids and teacher log-probs → (ids, absent): absent (N, K) bool marks −inf teacher entries,
    whose ids are redirected to the position's first id. Scattering at the redirected ids then touches
    kept ids only, and duplicates write equal values: deterministic. (No host sync: cheap on GPU.)"""
    absent = torch.isneginf(topk_logprobs)
    return torch.where(absent, topk_ids[..., :1], topk_ids), absent


def student_buckets(student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float = 1.0,
                    absent: torch.Tensor | None = None):
    """Student log-probs over V gathered into the K+1 buckets: (N, V), (N, K) → (N, K+1).

    log q_tail = logsumexp(z/τ over ids not in the top-k) − logsumexp(z/τ): computed on the complement,
    never as log(1 − Σ q), which cancels catastrophically when the top-k hold almost all the mass.
    absent (N, K) bool, from `present_ids` (whose ids to pass): those buckets get log q = LOG_ZERO.
    """
    scaled = student_logits.float() / temperature
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    topk = scaled.gather(-1, topk_ids) - log_norm
    if absent is not None:
        topk = topk.masked_fill(absent, LOG_ZERO)
    complement = scaled.scatter(-1, topk_ids, LOG_ZERO)
    tail = torch.logsumexp(complement, dim=-1, keepdim=True) - log_norm
    return torch.cat([topk, tail.clamp(min=LOG_ZERO)], dim=-1)


def full_support(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, student_logits: torch.Tensor) -> bool:
    """True when the top-k hold the whole vocabulary (K = V, nothing trimmed): the tail is empty."""
    return topk_ids.shape[-1] >= student_logits.shape[-1] and not bool(torch.isneginf(topk_logprobs).any())


def tail_support(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature: float = 1.0,
                 capture_temperature: float = 1.0, tail_model: str = "atom"):
    """Teacher and student log-probs over the K+1 buckets: each (N, K+1), or (N, K) when K = V (the
    tail is empty on both sides and is dropped, teacher renormalised over the rest)."""
    p = teacher_buckets(topk_logprobs, tail_logmass, capture_temperature, temperature, tail_model,
                        student_logits.shape[-1])
    ids, absent = present_ids(topk_ids, topk_logprobs)
    q = student_buckets(student_logits, ids, temperature, absent)
    if full_support(topk_ids, topk_logprobs, student_logits):
        # K = V: drop the tail rather than let the teacher's rounding residue (~1e-7) meet the
        # student's log(0).
        p, q = torch.log_softmax(p[..., :-1], -1), q[..., :-1]
    return p, q


def topk_support(student_logits, topk_ids, topk_logprobs, tail_logmass=None, temperature: float = 1.0,
                 capture_temperature: float = 1.0, tail_model: str = "atom"):
    """Teacher p_S / Σ p_S against softmax of the student's logits gathered at S: (N, K) each.

    Both sides normalised over S (not the student's softmax over V, which would compare
    distributions with different normalisers). The tail takes no part.
    """
    scaled = topk_logprobs.float().clamp(min=LOG_ZERO) * (capture_temperature / temperature)
    p = torch.log_softmax(scaled, dim=-1)
    gathered = student_logits.float().gather(-1, topk_ids) / temperature
    q = torch.log_softmax(gathered.masked_fill(torch.isneginf(topk_logprobs), LOG_ZERO), dim=-1)
    return p, q


def sampled_tail_buckets(topk_ids, topk_logprobs, tail_logmass, sampled_ids, sampled_counts):
    """The teacher side of `sampled_tail_support`: (log-probs (N, K + S + 1), slots (N, K + S), absent).

    slots: the top-k ids then the sampled ids; absent (N, K + S) bool marks slots that are no bucket
    (trimmed top-k entries; sampled ids without draws or inside the top-k), redirected to the first
    top-k id, so slots never repeat an id with different weights (as `present_ids`).
    """
    ids, absent = present_ids(topk_ids, topk_logprobs)
    in_topk = (sampled_ids.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1)  # (N, S)
    tail_counts = torch.where(in_topk, 0, sampled_counts).float()
    drawn = tail_counts.sum(-1, keepdim=True)  # C, tail draws per position
    log_tail = tail_logmass.float().clamp(min=LOG_ZERO).unsqueeze(-1)
    sampled_p = torch.where(tail_counts > 0, log_tail + torch.log(tail_counts) - torch.log(drawn.clamp(min=1.0)),
                            LOG_ZERO)
    rest_p = torch.where(drawn > 0, LOG_ZERO, log_tail)
    p = torch.cat([topk_logprobs.float().clamp(min=LOG_ZERO), sampled_p, rest_p], dim=-1)
    unused = tail_counts == 0
    slots = torch.cat([ids, torch.where(unused, ids[..., :1], sampled_ids)], dim=-1)
    return p, slots, torch.cat([absent, unused], dim=-1)


def sampled_tail_support(student_logits, topk_ids, topk_logprobs, tail_logmass, sampled_ids, sampled_counts,
                         temperature: float = 1.0):
    """The top-k ids, each sampled id outside them, and the rest: (N, K + S + 1) log-probs per side.

    The teacher's tail mass P is spread over the sampled ids that fell in the tail, in proportion to
    their counts: given C > 0 tail draws, E[P c_j / C] = p_j exactly (the draws that land in the tail
    are draws from the tail), so the completed distribution is an unbiased estimate of the teacher's
    whole one, exact on the top-k and carrying the tail's shape where the one-bucket tail carries only
    its total. A position with no tail draw keeps its tail as one bucket. Samples are drawn at the
    capture temperature and cannot be re-tempered: the caller trains at that temperature.
    sampled_ids, sampled_counts (N, S) as `teacher.signals.sample_targets` writes them (padding: count 0).
    """
    p, slots, absent = sampled_tail_buckets(topk_ids, topk_logprobs, tail_logmass, sampled_ids, sampled_counts)
    return p, student_buckets(student_logits, slots, temperature, absent)


SUPPORTS = {"tail": tail_support, "topk": topk_support}

