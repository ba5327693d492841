"""Attention losses: TinyBERT's per-head attention MSE, MiniLM's attention and value-relation KL.

Shapes: B rows, H heads, T tokens (a causal T × T matrix per head: row q is a distribution over keys
0..q), D value width, R relation heads. Teacher matrices come from the store decoded (rows sum to 1);
the student's are its own softmax outputs. Every loss averages over B, heads and the T query rows.
"""

from __future__ import annotations

import math

import torch

# A student probability that underflowed to 0 under a teacher with mass there: log of this, not −inf.
TINY = 1e-12


def group_heads(attention: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, T, T) → (B, G, T, T): the mean of each run of H / G consecutive heads (rows still sum to 1)."""
    B, H, T, _ = attention.shape
    return attention.reshape(B, groups, H // groups, T, T).mean(2)


def match_heads(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two (B, H, T, T) stacks to one head count: the finer side's heads are averaged in groups
    when one count divides the other, else both sides collapse to their head mean."""
    hs, ht = student.shape[1], teacher.shape[1]
    if hs == ht:
        return student, teacher
    if ht % hs == 0:
        return student, group_heads(teacher, hs)
    if hs % ht == 0:
        return group_heads(student, ht), teacher
    return group_heads(student, 1), group_heads(teacher, 1)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """TinyBERT: squared error of each head's attention row, summed over keys, mean over B, heads, rows.

    Matches attention probabilities (the store holds those), not TinyBERT's pre-softmax scores.
    """
    student, teacher = match_heads(student.float(), teacher.float())
    return (student - teacher).pow(2).sum(-1).mean()


def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher row ‖ student row) per head and query, mean over B, heads and rows."""
    student, teacher = match_heads(student.float(), teacher.float())
    log_ratio = torch.log(teacher.clamp(min=TINY)) - torch.log(student.clamp(min=TINY))
    return torch.where(teacher > 0, teacher * log_ratio, torch.zeros_like(teacher)).sum(-1).mean()


def value_relation(values: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM's value relation, causal: (B, T, D) values → (B, R, T, T) = softmax(V_r V_rᵀ / √(D/R)),
    each query row over keys 0..q. R = heads relation heads, each D / R wide (any width works)."""
    B, T, D = values.shape
    split = values.float().reshape(B, T, heads, D // heads).transpose(1, 2)  # (B, R, T, D/R)
    scores = split @ split.transpose(-1, -2) / math.sqrt(D // heads)  # (B, R, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=values.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def minilm_loss(student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                student_values: torch.Tensor | None = None,
                teacher_value_relation: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM on one (last) layer: attention KL + value-relation KL.

    student_values (B, T, D_s): the student's value projections of that layer, split into the
    teacher's relation heads R = teacher_value_relation.shape[1], so the student's width and head
    count may differ from the teacher's. Without value relations: the attention KL alone.
    """
    loss = attention_kl(student_attention, teacher_attention)
    if teacher_value_relation is not None:
        relation = value_relation(student_values, teacher_value_relation.shape[1])
        loss = loss + attention_kl(relation, teacher_value_relation)
    return loss


ATTENTION_LOSSES = ("minilm", "tinybert")
