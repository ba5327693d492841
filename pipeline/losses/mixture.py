"""KD from several teachers at once: the weighted mixture of their cached distributions.

Shapes as in buckets.py, plus M = Σ K_i: the teachers' top-k ids side by side (an id listed by several
teachers appears several times; only its first listing is a bucket, the others are empty on both sides).
"""

from __future__ import annotations

import math

import torch

from pipeline.losses.buckets import LOG_ZERO, masked_mean, teacher_buckets
from pipeline.losses.divergences import DIVERGENCES, split_loss_name


def mixture_buckets(student_logits, teachers, weights, temperature: float = 1.0,
                    capture_temperature: float = 1.0, tail_model: str = "atom"):
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
        buckets = teacher_buckets(logprobs, tail, capture_temperature, temperature, tail_model,
                                  student_logits.shape[-1])  # (N, K_i + 1)
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
               capture_temperature: float = 1.0, mask=None, tail_model: str = "atom", **options) -> torch.Tensor:
    """The KD loss `loss` (SUPPORT_DIVERGENCE) against the mixture of several teachers.

    tail_* losses compare the union buckets + tail of `mixture_buckets`; topk_* losses renormalise both
    sides over the union ids. With K_i = V: the dense divergence D(Σ w_i p_i, q). options: JSD's mixing.
    """
    support, kind = split_loss_name(loss)
    p, q = mixture_buckets(student_logits, teachers, weights, temperature, capture_temperature, tail_model)
    if support == "topk":
        m = sum(teacher_ids.shape[-1] for teacher_ids, _, _ in teachers)
        p, q = torch.log_softmax(p[..., :m], -1), torch.log_softmax(q[..., :m], -1)
    return masked_mean(DIVERGENCES[kind](p, q, **options), mask)
