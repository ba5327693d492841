"""CE and a KD loss from one softmax, with a hand-written backward: the default tail-bucket KL, sampled
KD and the top-k completed by sampled tail ids (all three are losses on a few singleton buckets + a tail).

The reference pair `cross_entropy` + `tail_kl` runs ~10 passes over the (N, V) logits through
autograd; this runs ~4. Shapes as in buckets.py; S sampled slots per position.
"""

from __future__ import annotations

import torch

from pipeline.losses.buckets import (LOG_ZERO, cross_entropy, full_support, present_ids, sampled_tail_buckets,
                                     teacher_buckets)
from pipeline.losses.divergences import tail_kl


class _CrossEntropyAndBucketKD(torch.autograd.Function):
    """CE and the KD on K singleton buckets + a tail from one softmax, with a hand-written backward.

    The reference `cross_entropy` + `tail_kl` pair runs ~10 passes over the (N, V) logits through
    autograd; this runs ~4 and allocates one (N, V) buffer (two when τ ≠ 1). Gradient w.r.t. s = z/τ of
    the coarsened KL: q_j − p_j for j in the top-k, q_j (1 − p_tail / q_tail) for j in the tail
    (teacher bucket masses summing to 1, or all 0 where kd_weight is 0). kl=False returns the
    cross-entropy −Σ p log q instead of the KL: the same gradient (sampled KD's value).
    Tail mass is summed over the tail ids themselves (top-k zeroed in place), never as 1 − Σ top-k.
    """

    @staticmethod
    def forward(ctx, logits, labels, ce_weight, topk_ids, teacher_logprobs, kd_weight, temperature, absent,
                kl=True):
        z = logits.float()  # (N, V)
        # Each (N, V) buffer is allocated once and then reused in place: on CPU, fresh buffers of this
        # size cost as much as the arithmetic (page faults on first touch). Log-probs are needed only at
        # the label and the top-k ids: z − lse there, with lse from the softmax's row maxima (at the
        # largest logit q = e⁰/Σ, so lse = max z − log max q). One softmax pass instead of a log_softmax
        # and an exp, each of which costs about twice a softmax on CPU.
        q1 = torch.softmax(z, dim=-1)
        lse1 = z.amax(-1, keepdim=True) - q1.amax(-1, keepdim=True).log()  # (N, 1)
        ce = (lse1 - z.gather(-1, labels.unsqueeze(-1))).squeeze(-1)
        z_topk = z.gather(-1, topk_ids)  # (N, K)
        q1_topk = (z_topk - lse1).exp()
        if temperature == 1.0:
            log_q_topk, q = z_topk - lse1, q1  # one buffer serves CE and KD
        else:
            scaled = z / temperature
            q = torch.softmax(scaled, dim=-1)  # student probabilities at τ
            log_q_topk = (z_topk / temperature) - (scaled.amax(-1, keepdim=True) - q.amax(-1, keepdim=True).log())
            del scaled
        # The tail is summed over its own ids. The top-k entries are left zeroed: backward overwrites them.
        q_tail = q.scatter_(-1, topk_ids, 0.0).sum(-1)  # (N,)
        p = teacher_logprobs.exp()  # (N, K+1)
        # Clamped: an empty bucket (p = 0) adds 0, not NaN, where the student's logit is −inf.
        log_q = torch.cat([log_q_topk, q_tail.log().unsqueeze(-1)], dim=-1).clamp(min=LOG_ZERO)
        kd = ((torch.special.xlogy(p, p) if kl else 0.0) - p * log_q).sum(-1)
        ctx.save_for_backward(q1, q, q1_topk, log_q_topk.exp(), topk_ids, p, q_tail, labels, ce_weight, kd_weight)
        ctx.temperature, ctx.absent = temperature, absent
        return torch.stack([(ce * ce_weight).sum(), (kd * kd_weight).sum()])

    @staticmethod
    def backward(ctx, grad):
        q1, q, q1_topk, q_topk, topk_ids, p, q_tail, labels, ce_weight, kd_weight = ctx.saved_tensors
        tau = ctx.temperature
        ce_coef = (ce_weight * grad[0]).unsqueeze(-1)  # (N, 1)
        kd_coef = (kd_weight * grad[1] / tau).unsqueeze(-1)
        # If every tail probability underflowed to 0, so does this factor (logit gaps > ~87 nats).
        ratio = torch.where(q_tail > 0, p[:, -1] / q_tail.clamp(min=1e-38), torch.zeros_like(q_tail))
        tail_coef = kd_coef * (1.0 - ratio.unsqueeze(-1))
        topk_grad = ce_coef * q1_topk + kd_coef * (q_topk - p[:, :-1])
        # Absent slots point at the first id: give them its gradient, so the scatter below is deterministic.
        topk_grad = torch.where(ctx.absent, topk_grad[:, :1], topk_grad)
        # The saved buffers become the gradient in place (backward runs once; no double backward). Their
        # top-k entries (zeroed in q) are written by the scatter below; q1's other entries are intact.
        if tau == 1.0:  # q and q1 are one buffer
            out = q1.mul_(ce_coef + tail_coef)
        else:
            out = q.mul_(tail_coef).addcmul_(q1, ce_coef.expand_as(q1))
        out.scatter_(-1, topk_ids, topk_grad)
        out.scatter_add_(-1, labels.unsqueeze(-1), -ce_coef)
        return out, None, None, None, None, None, None, None, None


def ce_and_tail_kl(student_logits, labels, ce_mask, topk_ids, topk_logprobs, tail_logmass,
                   temperature: float = 1.0, capture_temperature: float = 1.0, kd_mask=None,
                   tail_model: str = "atom"):
    """(CE, tail-bucket KL), each a masked mean, equal to `cross_entropy` and `tail_kl` but fused.

    student_logits (N, V); labels (N,) int64 (any id where ce_mask is false); ce_mask (N,) bool;
    topk_* (N, K); tail_logmass (N,). Falls back to the reference functions when K = V.
    """
    ids, absent = present_ids(topk_ids, topk_logprobs)
    if full_support(topk_ids, topk_logprobs, student_logits):
        return (cross_entropy(student_logits, labels, ce_mask),
                tail_kl(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature,
                        capture_temperature, kd_mask, tail_model))
    p = teacher_buckets(topk_logprobs, tail_logmass, capture_temperature, temperature, tail_model,
                        student_logits.shape[-1])
    return _fused(student_logits, labels, ce_mask, ids, p, absent, temperature, kd_mask)


def ce_and_sampled_kd(student_logits, labels, ce_mask, sampled_ids, sampled_counts, temperature: float = 1.0,
                      kd_mask=None):
    """(CE, sampled KD), each a masked mean, equal to `cross_entropy` and `sampled.sampled_kd` but fused.

    Sampled KD is the cross-entropy to p̂ = c / Σc on the sampled ids as buckets, with an empty tail.
    sampled_ids, sampled_counts (N, S) int64, a position's drawn ids distinct, as `sample_targets` writes
    them (padding: count 0; the backward scatters one gradient per id). A position without draws weighs 0
    but still counts in the mean, as in `sampled_kd`.
    """
    counts = sampled_counts.float()
    absent = counts == 0
    ids = torch.where(absent, sampled_ids[..., :1], sampled_ids)  # no id repeated with another weight
    weights = torch.log(counts) - torch.log(counts.sum(-1, keepdim=True).clamp(min=1.0))
    p = torch.cat([weights.clamp(min=LOG_ZERO), torch.full_like(weights[..., :1], LOG_ZERO)], dim=-1)
    return _fused(student_logits, labels, ce_mask, ids, p, absent, temperature, kd_mask, (~absent).any(-1), kl=False)


def ce_and_topk_sampled_kd(student_logits, labels, ce_mask, topk_ids, topk_logprobs, tail_logmass, sampled_ids,
                           sampled_counts, temperature: float = 1.0):
    """(CE, KD), equal to `cross_entropy` and `sampled.topk_sampled_kd` (mean over positions) but fused."""
    p, slots, absent = sampled_tail_buckets(topk_ids, topk_logprobs, tail_logmass, sampled_ids, sampled_counts)
    return _fused(student_logits, labels, ce_mask, slots, p, absent, temperature, None)


def _fused(student_logits, labels, ce_mask, ids, p, absent, temperature, kd_mask, has_target=None, kl=True):
    """Masks (N,) bool or None → per-position weights of the two masked means; the (CE, KD) pair.
    has_target (N,) bool: positions that take part in KD's gradient (all of kd_mask's when None)."""
    ones = torch.ones(student_logits.shape[0], device=student_logits.device)
    ce_mask = ones if ce_mask is None else ce_mask.float()
    kd_mask = ones if kd_mask is None else kd_mask.float()
    kd_weight = kd_mask / kd_mask.sum().clamp(min=1.0)
    if has_target is not None:
        kd_weight = kd_weight * has_target
    both = _CrossEntropyAndBucketKD.apply(student_logits, labels, ce_mask / ce_mask.sum().clamp(min=1.0),
                                          ids, p, kd_weight, temperature, absent, kl)
    return both[0], both[1]
