"""Align two tokenizations of the same text by character offsets (cross-tokenizer students).

A causal LM's position i predicts token i + 1 after reading the text before that token's first
character. A student position i is aligned with the teacher position j whose next token starts at
the same character: both have read exactly the same text and predict what comes from there on.
Positions with no such partner (the next student token starts inside a teacher token) are unaligned.

Spans are (start, end) character offsets of each token, in one coordinate system for both sides
(e.g. offsets within the same document).
"""

from __future__ import annotations

import numpy as np


def align_positions(student_spans: np.ndarray, teacher_spans: np.ndarray) -> np.ndarray:
    """(N_s, 2), (N_t, 2) token spans → (N_s,) int64: for each student position i, the teacher
    position j with teacher_spans[j + 1, 0] == student_spans[i + 1, 0], or −1 (unaligned; the last
    position predicts nothing and is always −1)."""
    student_starts = np.asarray(student_spans)[1:, 0]
    teacher_starts = np.asarray(teacher_spans)[1:, 0]  # the next token of teacher position j = index j
    aligned = np.full(len(student_starts), -1, dtype=np.int64)
    if len(teacher_starts):
        order = np.argsort(teacher_starts, kind="stable")
        found = np.minimum(np.searchsorted(teacher_starts[order], student_starts), len(order) - 1)
        hit = teacher_starts[order][found] == student_starts
        aligned[hit] = order[found][hit]
    return np.concatenate([aligned, [-1]]).astype(np.int64)


def aligned_share(alignment: np.ndarray) -> float:
    """Fraction of student positions that predict something and have a teacher partner."""
    predicting = alignment[:-1] if len(alignment) else alignment
    return float((predicting >= 0).mean()) if len(predicting) else 0.0
