"""Evaluation metrics: the expected calibration error by hand and through `run_evaluate` on real models."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import EvaluateConfig
from pipeline.evaluate import expected_calibration_error, run_evaluate
from pipeline.models import load_model


def test_ece_of_a_hand_computed_example():
    # 15 bins of width 1/15: 0.05 -> bin 0; 0.5, 0.52 -> bin 7; 0.9 -> bin 13; 0.95, 1.0 -> bin 14.
    confidence = np.array([0.05, 0.5, 0.52, 0.9, 0.95, 1.0])
    correct = np.array([False, True, False, True, True, True])
    # bin 0: |0 - 0.05| · 1; bin 7: |0.5 - 0.51| · 2; bin 13: |1 - 0.9| · 1; bin 14: |1 - 0.975| · 2
    expected = (0.05 + 0.02 + 0.1 + 0.05) / 6
    assert expected_calibration_error(confidence, correct) == pytest.approx(expected)


def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    confidence = np.full(10, 0.7)
    assert expected_calibration_error(confidence, np.arange(10) < 7) == pytest.approx(0.0)
    assert expected_calibration_error(np.full(4, 0.99), np.zeros(4, bool)) == pytest.approx(0.99)
    assert expected_calibration_error(np.array([]), np.array([], bool)) == 0.0


def dense_ece(model, blocks: np.ndarray, vocab_size: int, bins: int = 15) -> float:
    """Reference: every position's softmax, binned one position at a time."""
    with torch.no_grad():
        ids = torch.from_numpy(blocks.astype(np.int64))
        probs = torch.softmax(model(input_ids=ids).logits[:, :-1, :vocab_size].double(), -1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == ids[:, 1:]).flatten().tolist()
    confidence = confidence.flatten().tolist()
    members = [[] for _ in range(bins)]
    for c, ok in zip(confidence, correct):
        members[min(int(c * bins), bins - 1)].append((c, ok))
    total = 0.0
    for inside in members:
        if inside:
            accuracy = sum(ok for _, ok in inside) / len(inside)
            mean_confidence = sum(c for c, _ in inside) / len(inside)
            total += len(inside) * abs(accuracy - mean_confidence)
    return total / len(confidence)


def test_run_evaluate_reports_the_ece_of_each_model(make_teacher, tiny_tokens, tmp_path):
    teacher = make_teacher(n_layer=1, n_embd=32, max_steps=6)
    out = tmp_path / "metrics.json"
    config = EvaluateConfig(batch_size=4, max_batches=2, latency_rounds=1)
    result = run_evaluate(config, str(tiny_tokens.path), {"teacher": str(teacher)}, str(out))
    assert json.loads(out.read_text())["models"]["teacher"]["ece"] == result["models"]["teacher"]["ece"]
    blocks = tiny_tokens.blocks("validation")[:8]
    expected = dense_ece(load_model(str(teacher), "teacher").eval(), blocks, tiny_tokens.vocab_size)
    assert result["models"]["teacher"]["ece"] == pytest.approx(expected, abs=1e-5)
