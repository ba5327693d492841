"""Intermediate-layer losses: student hidden states (projected to the teacher's width) vs cached ones.

Shapes: N positions, D the teacher's width (or the rank of a low-rank store).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses.buckets import masked_mean


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean squared error per position, averaged over the width: (N, D), (N, D) → scalar.

    The student side is already projected to the teacher's width (a learned nn.Linear in training).
    """
    return masked_mean((student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1), mask)


def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean of 1 − cosine similarity per position: (N, D), (N, D) → scalar in [0, 2].

    The student side is already projected to the teacher's width, as for `hidden_mse`.
    """
    similarity = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return masked_mean(1.0 - similarity, mask)
