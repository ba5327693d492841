"""Universal Logit Distillation (Boizard et al. 2024) from cached sorted top-k + tail.

ULD compares the teacher's and the student's probability vectors each sorted in decreasing order,
so the two need no shared vocabulary: Σ_i |p_(i) − q_(i)| (the closed form of the Wasserstein-1
distance they use, vectors zero-padded to one length). The store keeps only the teacher's K largest
probabilities and the mass of the rest, so the sum runs over the K largest of each side plus one
tail term |p_tail − q_tail|, q_tail = 1 − Σ_{i≤K} q_(i): a lower bound of the dense sum (the tails'
own entries are not compared one by one), equal to it when K covers both vocabularies.

Shapes: N positions, K cached entries, V_s the student's vocabulary.
"""

from __future__ import annotations

import torch

from pipeline.losses.buckets import masked_mean


def uld_loss(student_logits: torch.Tensor, topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """student_logits (N, V_s); the teacher's sorted topk_logprobs (N, K) (−inf for trimmed entries)
    and tail_logmass (N,) → mean over masked positions of the sorted-vector distance."""
    teacher = topk_logprobs.float().exp()  # (N, K), sorted decreasing; exp(−inf) = 0
    K = teacher.shape[-1]
    student = torch.softmax(student_logits.float(), dim=-1)
    kept = min(K, student.shape[-1])
    top = student.topk(kept, dim=-1, sorted=True).values  # (N, min(K, V_s))
    if kept < K:  # a student vocabulary smaller than K: its missing ranks hold 0
        top = torch.cat([top, top.new_zeros(top.shape[0], K - kept)], dim=-1)
    student_tail = (1 - top.sum(-1)).clamp(min=0)
    per_position = (teacher - top).abs().sum(-1) + (tail_logmass.float().exp() - student_tail).abs()
    return masked_mean(per_position, mask)
