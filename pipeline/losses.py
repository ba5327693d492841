"""Distillation losses: pure functions on tensors (DESIGN §4).

Shapes: N positions (batch × time flattened), V vocabulary, K cached top-k entries, D hidden width.
Every loss averages over the positions where `mask` is true; with no such position it returns 0.
Teacher log-probs ℓ were cached at the capture temperature τc; losses take the train temperature τ.
Teacher top-k entries with log-prob −inf are absent (trimmed by top-p; their id is padding): every
top-k loss gives them exactly zero weight, on both sides, and their ids stay in the student's tail.
A position's first entry is always present.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from pipeline.errors import KdcacheError

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


def kl_from_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) per row; zero-probability teacher entries contribute exactly 0."""
    p = teacher_logprobs.exp()
    return (torch.special.xlogy(p, p) - p * student_logprobs).sum(-1)


def tail_kl(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature: float = 1.0,
            capture_temperature: float = 1.0, mask=None) -> torch.Tensor:
    """KL between the (K+1)-way coarsenings of teacher and student (the default KD loss).

    Equals the dense KL(p ‖ q) when K = V. student_logits (N, V); topk_* (N, K); tail_logmass (N,).
    """
    p, q = _tail_bucket_logprobs(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature,
                                 capture_temperature)
    return masked_mean(kl_from_logprobs(p, q), mask)


def topk_kl(student_logits, topk_ids, topk_logprobs, temperature: float = 1.0,
            capture_temperature: float = 1.0, mask=None) -> torch.Tensor:
    """KL with both sides renormalised over the cached top-k ids.

    Teacher p_S / Σ p_S against softmax of the student's logits gathered at S (not the student's
    softmax over V, which would compare distributions with different normalisers).
    """
    p, q = _topk_logprobs(student_logits, topk_ids, topk_logprobs, temperature, capture_temperature)
    return masked_mean(kl_from_logprobs(p, q), mask)


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean squared error per position, averaged over the width: (N, D), (N, D) → scalar.

    The student side is already projected to the teacher's width (a learned nn.Linear in training).
    """
    return masked_mean((student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1), mask)


class _CrossEntropyAndTailKL(torch.autograd.Function):
    """CE and tail-bucket KL from one softmax, with a hand-written backward.

    The reference `cross_entropy` + `tail_kl` pair runs ~10 passes over the (N, V) logits through
    autograd; this runs ~4 and allocates one (N, V) buffer (two when τ ≠ 1). Gradient w.r.t. s = z/τ of
    the coarsened KL: q_j − p_j for j in the top-k, q_j (1 − p_tail / q_tail) for j in the tail.
    Tail mass is summed over the tail ids themselves (top-k zeroed in place), never as 1 − Σ top-k.
    """

    @staticmethod
    def forward(ctx, logits, labels, ce_weight, topk_ids, teacher_logprobs, kd_weight, temperature, absent):
        z = logits.float()  # (N, V)
        # Each (N, V) buffer is allocated once and then reused in place: on CPU, fresh buffers of this
        # size cost as much as the arithmetic (page faults on first touch).
        log_q1 = torch.log_softmax(z, dim=-1)
        ce = -log_q1.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        if temperature == 1.0:
            log_q_topk = log_q1.gather(-1, topk_ids)  # (N, K)
            q1 = q = log_q1.exp_()  # one buffer serves CE and KD
        else:
            q1 = log_q1.exp_()
            log_q = torch.log_softmax(z / temperature, dim=-1)
            log_q_topk = log_q.gather(-1, topk_ids)
            q = log_q.exp_()  # student probabilities at τ
        q_topk = q.gather(-1, topk_ids)
        q.scatter_(-1, topk_ids, 0.0)
        q_tail = q.sum(-1)  # (N,)
        q.scatter_(-1, topk_ids, q_topk)
        p = teacher_logprobs.exp()  # (N, K+1)
        log_q = torch.cat([log_q_topk, q_tail.log().clamp(min=LOG_ZERO).unsqueeze(-1)], dim=-1)
        kl = (torch.special.xlogy(p, p) - p * log_q).sum(-1)
        ctx.save_for_backward(q1, q, topk_ids, p, q_tail, labels, ce_weight, kd_weight)
        ctx.temperature, ctx.absent = temperature, absent
        return torch.stack([(ce * ce_weight).sum(), (kl * kd_weight).sum()])

    @staticmethod
    def backward(ctx, grad):
        q1, q, topk_ids, p, q_tail, labels, ce_weight, kd_weight = ctx.saved_tensors
        tau = ctx.temperature
        ce_coef = (ce_weight * grad[0]).unsqueeze(-1)  # (N, 1)
        kd_coef = (kd_weight * grad[1] / tau).unsqueeze(-1)
        # If every tail probability underflowed to 0, so does this factor (logit gaps > ~87 nats).
        ratio = torch.where(q_tail > 0, p[:, -1] / q_tail.clamp(min=1e-38), torch.zeros_like(q_tail))
        tail_coef = kd_coef * (1.0 - ratio.unsqueeze(-1))
        topk_grad = ce_coef * q1.gather(-1, topk_ids) + kd_coef * (q.gather(-1, topk_ids) - p[:, :-1])
        # Absent slots point at the first id: give them its gradient, so the scatter below is deterministic.
        topk_grad = torch.where(ctx.absent, topk_grad[:, :1], topk_grad)
        # The saved buffers become the gradient in place (backward runs once; no double backward).
        if tau == 1.0:  # q and q1 are one buffer
            out = q1.mul_(ce_coef + tail_coef)
        else:
            out = q.mul_(tail_coef).addcmul_(q1, ce_coef.expand_as(q1))
        out.scatter_(-1, topk_ids, topk_grad)
        out.scatter_add_(-1, labels.unsqueeze(-1), -ce_coef)
        return out, None, None, None, None, None, None, None


def ce_and_tail_kl(student_logits, labels, ce_mask, topk_ids, topk_logprobs, tail_logmass,
                   temperature: float = 1.0, capture_temperature: float = 1.0, kd_mask=None):
    """(CE, tail-bucket KL), each a masked mean, equal to `cross_entropy` and `tail_kl` but fused.

    student_logits (N, V); labels (N,) int64 (any id where ce_mask is false); ce_mask (N,) bool;
    topk_* (N, K); tail_logmass (N,). Falls back to the reference functions when K = V.
    """
    ids, absent = present_ids(topk_ids, topk_logprobs)
    if topk_ids.shape[-1] >= student_logits.shape[-1] and not bool(absent.any()):
        return (cross_entropy(student_logits, labels, ce_mask),
                tail_kl(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature,
                        capture_temperature, kd_mask))
    n = student_logits.shape[0]
    ones = torch.ones(n, device=student_logits.device)
    ce_mask = ones if ce_mask is None else ce_mask.float()
    kd_mask = ones if kd_mask is None else kd_mask.float()
    p = teacher_buckets(topk_logprobs, tail_logmass, capture_temperature, temperature)
    both = _CrossEntropyAndTailKL.apply(student_logits, labels, ce_mask / ce_mask.sum().clamp(min=1.0),
                                        ids, p, kd_mask / kd_mask.sum().clamp(min=1.0), temperature, absent)
    return both[0], both[1]


# --- Divergences between bucket log-distributions ------------------------------------------------
# Each takes teacher log-probs p and student log-probs q over the same B buckets (N, B) → (N,). The
# tail_* losses pass B = K+1 buckets (top-k, then the tail); the topk_* losses pass B = K, both sides
# renormalised over the top-k ids. Inputs may hold -inf; they are clamped to LOG_ZERO so that empty
# buckets contribute exactly 0 to values and gradients.

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


def jsd_from_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float = 0.5):
    """Generalised JSD per row: β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = β p + (1 − β) q. (N, B) → (N,).

    log m comes from a logsumexp over the two weighted logs, so no probability is ever subtracted and
    m > 0 wherever either side is: the value is finite (≤ log 2 at β = 0.5) even with empty buckets.
    """
    if not 0.0 < beta < 1.0:
        raise KdcacheError(f"JSD beta must lie strictly between 0 and 1, got {beta}.")
    log_p, log_q = teacher_logprobs.clamp(min=LOG_ZERO), student_logprobs.clamp(min=LOG_ZERO)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)


def tv_from_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Total variation ½ Σ |p − q| per row: (N, B), (N, B) → (N,), in [0, 1]."""
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


def _tail_bucket_logprobs(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature: float,
                          capture_temperature: float):
    """Teacher and student log-probs over the K+1 buckets, as in `tail_kl`: each (N, K+1), or (N, K)
    when K = V (the tail is empty on both sides and is dropped, teacher renormalised over the rest)."""
    p = teacher_buckets(topk_logprobs, tail_logmass, capture_temperature, temperature)
    ids, absent = present_ids(topk_ids, topk_logprobs)
    q = student_buckets(student_logits, ids, temperature, absent)
    if topk_ids.shape[-1] >= student_logits.shape[-1] and not bool(absent.any()):
        # K = V: the tail is empty on both sides; drop it rather than let the teacher's rounding
        # residue (~1e-7) meet the student's log(0).
        p, q = torch.log_softmax(p[..., :-1], -1), q[..., :-1]
    return p, q


def _topk_logprobs(student_logits, topk_ids, topk_logprobs, temperature: float, capture_temperature: float):
    """Teacher and student log-probs, each renormalised over the top-k ids, as in `topk_kl`: (N, K) each."""
    scaled = topk_logprobs.float().clamp(min=LOG_ZERO) * (capture_temperature / temperature)
    p = torch.log_softmax(scaled, dim=-1)
    gathered = student_logits.float().gather(-1, topk_ids) / temperature
    q = torch.log_softmax(gathered.masked_fill(torch.isneginf(topk_logprobs), LOG_ZERO), dim=-1)
    return p, q


def tail_rkl(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature: float = 1.0,
             capture_temperature: float = 1.0, mask=None) -> torch.Tensor:
    """Reverse KL(q ‖ p) on the K+1 buckets; dense KL(q ‖ p) when K = V. Shapes as `tail_kl`."""
    p, q = _tail_bucket_logprobs(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature,
                                 capture_temperature)
    return masked_mean(reverse_kl_from_logprobs(p, q), mask)


def topk_rkl(student_logits, topk_ids, topk_logprobs, temperature: float = 1.0,
             capture_temperature: float = 1.0, mask=None) -> torch.Tensor:
    """Reverse KL(q ‖ p), both sides renormalised over the top-k ids. Shapes as `topk_kl`."""
    p, q = _topk_logprobs(student_logits, topk_ids, topk_logprobs, temperature, capture_temperature)
    return masked_mean(reverse_kl_from_logprobs(p, q), mask)


def tail_jsd(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature: float = 1.0,
             capture_temperature: float = 1.0, mask=None, beta: float = 0.5) -> torch.Tensor:
    """Generalised JSD_β(p ‖ q) on the K+1 buckets (see `jsd_from_logprobs`). Shapes as `tail_kl`."""
    p, q = _tail_bucket_logprobs(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature,
                                 capture_temperature)
    return masked_mean(jsd_from_logprobs(p, q, beta), mask)


def topk_jsd(student_logits, topk_ids, topk_logprobs, temperature: float = 1.0,
             capture_temperature: float = 1.0, mask=None, beta: float = 0.5) -> torch.Tensor:
    """Generalised JSD_β(p ‖ q), both sides renormalised over the top-k ids. Shapes as `topk_kl`."""
    p, q = _topk_logprobs(student_logits, topk_ids, topk_logprobs, temperature, capture_temperature)
    return masked_mean(jsd_from_logprobs(p, q, beta), mask)


def tail_tv(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature: float = 1.0,
            capture_temperature: float = 1.0, mask=None) -> torch.Tensor:
    """Total variation on the K+1 buckets; dense ½ Σ |p − q| when K = V. Shapes as `tail_kl`."""
    p, q = _tail_bucket_logprobs(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature,
                                 capture_temperature)
    return masked_mean(tv_from_logprobs(p, q), mask)


def topk_tv(student_logits, topk_ids, topk_logprobs, temperature: float = 1.0,
            capture_temperature: float = 1.0, mask=None) -> torch.Tensor:
    """Total variation, both sides renormalised over the top-k ids. Shapes as `topk_kl`."""
    p, q = _topk_logprobs(student_logits, topk_ids, topk_logprobs, temperature, capture_temperature)
    return masked_mean(tv_from_logprobs(p, q), mask)


def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean of 1 − cosine similarity per position: (N, D), (N, D) → scalar in [0, 2].

    The student side is already projected to the teacher's width, as for `hidden_mse`.
    """
    similarity = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return masked_mean(1.0 - similarity, mask)


def _ignoring_tail(topk_loss):
    """Give a topk_* loss the registry signature: it takes tail_logmass and ignores it."""
    @functools.wraps(topk_loss)
    def loss(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature: float = 1.0,
             capture_temperature: float = 1.0, mask=None, **options):
        return topk_loss(student_logits, topk_ids, topk_logprobs, temperature, capture_temperature, mask,
                         **options)
    del loss.__wrapped__  # so inspect.signature reports the registry signature, not topk_loss's
    return loss


# Every KD loss by name, with one signature:
#   fn(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature=1.0, capture_temperature=1.0,
#      mask=None) → scalar
# The JSD entries take beta=0.5 by keyword: functools.partial(KD_LOSS_FUNCTIONS["tail_jsd"], beta=0.1).
KD_LOSS_FUNCTIONS = {
    "tail_kl": tail_kl,
    "topk_kl": _ignoring_tail(topk_kl),
    "tail_rkl": tail_rkl,
    "topk_rkl": _ignoring_tail(topk_rkl),
    "tail_jsd": tail_jsd,
    "topk_jsd": _ignoring_tail(topk_jsd),
    "tail_tv": tail_tv,
    "topk_tv": _ignoring_tail(topk_tv),
}


def sampled_kd(student_logits: torch.Tensor, sampled_ids: torch.Tensor, sampled_counts: torch.Tensor,
               temperature: float = 1.0, mask=None) -> torch.Tensor:
    """Random-sampling KD (Anshumann et al., ACL 2025): −Σ_j (c_j / Σc) log q_j, masked mean over positions.

    student_logits (N, V); sampled_ids, sampled_counts (N, S) int64 from `teacher.sample_targets`
    (padding: count 0, contributes nothing); q = log_softmax(student_logits / τ). It is the cross-entropy
    to the empirical teacher distribution p̂ = c / Σc. Since E[p̂] = p, its expected gradient w.r.t. the
    student logits, (q − p̂) / τ per position, equals that of the dense forward KL(p ‖ q): the sampled
    loss is an unbiased estimate of the dense KD gradient (the value differs by the constant entropy
    of p̂), unlike top-k losses, which are biased. A position whose counts are all 0 contributes 0.
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, sampled_ids)
    counts = sampled_counts.to(log_q.dtype)
    weights = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
    # where(), not weights * log_q alone: a padded id the student gives log q = −inf must add 0, not NaN.
    terms = torch.where(counts > 0, weights * log_q, torch.zeros_like(log_q))
    return masked_mean(-terms.sum(-1), mask)


# --- Several teachers ------------------------------------------------------------------------------
# Shapes as above, plus M = Σ K_i: the teachers' top-k ids side by side (an id listed by several
# teachers appears several times; only its first listing is a bucket, the others are empty on both sides).

DIVERGENCES = {"kl": kl_from_logprobs, "rkl": reverse_kl_from_logprobs, "jsd": jsd_from_logprobs,
               "tv": tv_from_logprobs}


def mixture_buckets(student_logits, teachers, weights, temperature: float = 1.0,
                    capture_temperature: float = 1.0):
    """Teacher mixture Σ w_i p_i and student log-probs on the union of the teachers' top-k ids + a tail.

    teachers: one (topk_ids (N, K_i), topk_logprobs (N, K_i), tail_logmass (N,)) per teacher; weights
    (positive, summing to 1). Each teacher is first brought to the train temperature on its own K_i + 1
    buckets (`teacher_buckets`). An id outside teacher i's top-k gets probability 0 from teacher i, and
    the mixture's tail is Σ w_i p_tail_i: exact when some K_i = V (the tail is then dropped, as in
    `tail_kl`); otherwise mass teacher i left in its tail on ids another teacher lists stays in the tail.
    Entries with log-prob −inf (or LOG_ZERO) are absent. Returns (p, q), each (N, M+1), or (N, M) at K = V.
    """
    ids = torch.cat([teacher_ids for teacher_ids, _, _ in teachers], dim=-1)  # (N, M)
    present = torch.cat([logprobs.float() > LOG_ZERO for _, logprobs, _ in teachers], dim=-1)
    mixed, tails = [], []
    for (teacher_ids, logprobs, tail), weight in zip(teachers, weights):
        buckets = teacher_buckets(logprobs, tail, capture_temperature, temperature)  # (N, K_i + 1)
        listed = ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)  # (N, M, K_i)
        # amax, not a sum: an id sits at most once among a teacher's present entries.
        at_union = torch.where(listed, buckets[:, None, :-1], LOG_ZERO).amax(-1)  # (N, M)
        mixed.append(at_union + math.log(weight))
        tails.append(buckets[:, -1] + math.log(weight))
    # A bucket per distinct present id: its first present listing (m' < m scans the lower triangle).
    m = ids.shape[-1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=ids.device).tril(-1)  # [m, m'] = m' < m
    repeated = ((ids.unsqueeze(-1) == ids.unsqueeze(-2)) & present.unsqueeze(-2) & earlier).any(-1)
    first = present & ~repeated  # (N, M)
    p = torch.cat([torch.where(first, torch.logsumexp(torch.stack(mixed), 0), LOG_ZERO),
                   torch.logsumexp(torch.stack(tails), 0).unsqueeze(-1)], dim=-1).clamp(min=LOG_ZERO)

    scaled = student_logits.float() / temperature
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    # Union membership by counting (scatter_add), since scatter of repeated ids would race.
    in_union = torch.zeros_like(scaled).scatter_add_(-1, ids, present.to(scaled.dtype)) > 0  # (N, V)
    tail = torch.logsumexp(scaled.masked_fill(in_union, LOG_ZERO), dim=-1, keepdim=True) - log_norm
    q = torch.cat([torch.where(first, scaled.gather(-1, ids) - log_norm, LOG_ZERO), tail], dim=-1)
    q = q.clamp(min=LOG_ZERO)
    if max(teacher_ids.shape[-1] for teacher_ids, _, _ in teachers) >= student_logits.shape[-1]:
        p, q = torch.log_softmax(p[..., :-1], -1), q[..., :-1]  # the union is the vocabulary: no tail
    return p, q


def mixture_kd(student_logits, teachers, weights, loss: str = "tail_kl", temperature: float = 1.0,
               capture_temperature: float = 1.0, mask=None, **options) -> torch.Tensor:
    """The KD loss `loss` (a KD_LOSS_FUNCTIONS name) against the mixture of several teachers.

    tail_* losses compare the union buckets + tail of `mixture_buckets`; topk_* losses renormalise both
    sides over the union ids. With K_i = V: the dense divergence D(Σ w_i p_i, q). options: JSD's beta.
    """
    support, kind = loss.split("_", 1)
    p, q = mixture_buckets(student_logits, teachers, weights, temperature, capture_temperature)
    if support == "topk":
        m = sum(teacher_ids.shape[-1] for teacher_ids, _, _ in teachers)
        p, q = torch.log_softmax(p[..., :m], -1), torch.log_softmax(q[..., :m], -1)
    return masked_mean(DIVERGENCES[kind](p, q, **options), mask)
