"""CE and the default KD loss (tail-bucket KL) from one softmax, with a hand-written backward.

The reference pair `cross_entropy` + `tail_kl` runs ~10 passes over the (N, V) logits through
autograd; this runs ~4. Shapes as in buckets.py.
"""

from __future__ import annotations

import torch

from pipeline.losses.buckets import LOG_ZERO, cross_entropy, full_support, present_ids, teacher_buckets
from pipeline.losses.divergences import tail_kl


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
    n = student_logits.shape[0]
    ones = torch.ones(n, device=student_logits.device)
    ce_mask = ones if ce_mask is None else ce_mask.float()
    kd_mask = ones if kd_mask is None else kd_mask.float()
    p = teacher_buckets(topk_logprobs, tail_logmass, capture_temperature, temperature, tail_model,
                        student_logits.shape[-1])
    both = _CrossEntropyAndTailKL.apply(student_logits, labels, ce_mask / ce_mask.sum().clamp(min=1.0),
                                        ids, p, kd_mask / kd_mask.sum().clamp(min=1.0), temperature, absent)
    return both[0], both[1]
