"""ULD from cached top-k + tail against hand-computed values; offset alignment on hand-made tokenizations."""

import math

import numpy as np
import pytest
import torch

from pipeline.data.alignment import align_positions, aligned_share
from pipeline.losses.uld import uld_loss


def test_uld_matches_a_hand_computed_value():
    # Teacher over its own vocabulary: sorted 0.5, 0.3 cached (K = 2), tail 0.2.
    topk = torch.log(torch.tensor([[0.5, 0.3]]))
    tail = torch.log(torch.tensor([0.2]))
    # Student over 3 ids (another vocabulary): probabilities 0.1, 0.6, 0.3 → sorted 0.6, 0.3, tail 0.1.
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    expected = abs(0.5 - 0.6) + abs(0.3 - 0.3) + abs(0.2 - 0.1)
    assert float(uld_loss(logits, topk, tail)) == pytest.approx(expected, abs=1e-6)


def test_uld_equals_the_dense_sorted_distance_when_k_covers_both():
    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(4, 5), -1)
    student_logits = torch.randn(4, 3)  # the student's vocabulary is smaller than the teacher's
    sorted_teacher = teacher.sort(-1, descending=True).values
    loss = uld_loss(student_logits, sorted_teacher.log(), torch.full((4,), float("-inf")))
    student = torch.softmax(student_logits, -1).sort(-1, descending=True).values
    padded = torch.cat([student, torch.zeros(4, 2)], -1)
    torch.testing.assert_close(loss, (sorted_teacher - padded).abs().sum(-1).mean())
    mask = torch.tensor([True, False, False, False])
    torch.testing.assert_close(uld_loss(student_logits, sorted_teacher.log(), torch.full((4,), -math.inf), mask),
                               (sorted_teacher - padded).abs().sum(-1)[0])


def spans(text, pieces):
    """Character spans of `pieces`, which concatenate to `text`."""
    assert "".join(pieces) == text
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]])
    return np.stack([starts, starts + [len(p) for p in pieces]], 1)


def test_alignment_on_hand_made_tokenizations():
    text = "the cat sat"
    teacher = spans(text, ["the", " cat", " sat"])                  # positions 0, 1, 2
    student = spans(text, ["th", "e", " c", "at", " sat"])           # positions 0..4
    alignment = align_positions(student, teacher)
    # student 0 ("th") predicts "e" (starts at 2): no teacher token starts there → −1
    # student 1 ("e") predicts " c" at 3 = teacher 0's next token " cat" → 0
    # student 2 (" c") predicts "at" at 5: inside " cat" → −1
    # student 3 ("at") predicts " sat" at 7 = teacher 1's next token → 1
    # student 4: last position, predicts nothing → −1
    assert alignment.tolist() == [-1, 0, -1, 1, -1]
    assert aligned_share(alignment) == pytest.approx(0.5)
    same = align_positions(teacher, teacher)
    assert same.tolist() == [0, 1, -1] and aligned_share(same) == 1.0
