"""Random-sampling KD (Anshumann et al., ACL 2025) on cached sampled ids + counts."""

from __future__ import annotations

import torch

from pipeline.losses.buckets import masked_mean, sampled_tail_support
from pipeline.losses.divergences import kl_from_logprobs


def sampled_kd(student_logits: torch.Tensor, sampled_ids: torch.Tensor, sampled_counts: torch.Tensor,
               temperature: float = 1.0, mask=None) -> torch.Tensor:
    """Random-sampling KD (Anshumann et al., ACL 2025): −Σ_j (c_j / Σc) log q_j, masked mean over positions.

    student_logits (N, V); sampled_ids, sampled_counts (N, S) int64 from `teacher.signals.sample_targets`
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


def topk_sampled_kd(student_logits, topk_ids, topk_logprobs, tail_logmass, sampled_ids, sampled_counts,
                    temperature: float = 1.0) -> torch.Tensor:
    """KL from the top-k completed by the sampled ids in the tail (`buckets.sampled_tail_support`) to
    the student, mean over positions. Both signals of one store: the top-k exact, the tail's shape
    estimated without bias, so the loss tracks dense KD closer than either signal alone (BENCHMARKS §12)."""
    p, q = sampled_tail_support(student_logits, topk_ids, topk_logprobs, tail_logmass, sampled_ids,
                                sampled_counts, temperature)
    return kl_from_logprobs(p, q).mean()
