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


def hidden_relative_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask=None) -> torch.Tensor:
    """`hidden_mse` ÷ the teacher's variance over these positions (per width unit, about its mean
    state): (N, D), (N, D) → scalar, 1 for a student that predicts the mean state.

    Scale-free, so β weighs the term the same whatever the teacher's activation scale: a pretrained
    LM's residual stream can run orders of magnitude larger than a small model's, and its plain MSE
    then swamps the other terms (SmolLM2, BENCHMARKS §17). The variance is the teacher's, a constant of the batch (no gradient flows through it).
    """
    teacher = teacher_hidden.float() if mask is None else teacher_hidden.float()[mask.reshape(-1).bool()]
    if len(teacher) == 0:  # every position masked: hidden_mse's zero, not 0 / an empty variance
        return hidden_mse(student_hidden, teacher_hidden, mask)
    variance = (teacher - teacher.mean(0)).pow(2).mean().clamp(min=1e-12)
    return hidden_mse(student_hidden, teacher_hidden, mask) / variance


HIDDEN_LOSSES = {"mse": hidden_mse, "relative": hidden_relative_mse}


def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean of 1 − cosine similarity per position: (N, D), (N, D) → scalar in [0, 2].

    The student side is already projected to the teacher's width, as for `hidden_mse`.
    """
    similarity = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return masked_mean(1.0 - similarity, mask)
