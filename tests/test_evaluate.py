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


def test_training_and_evaluate_report_the_same_val_loss_and_the_shipped_weights(small_tokens, tmp_path):
    """The student's last logged val_loss is evaluate's on the same blocks; disk_bytes leaves out the
    checkpoint written beside the weights; the Markdown table has one row per model."""
    import csv

    from pipeline.config import StudentConfig
    from pipeline.student import run_student
    from pipeline.training.loop import TrainFiles

    out = tmp_path / "student"
    config = StudentConfig(n_layer=1, n_embd=16, n_head=2, batch_size=4, max_steps=2, warmup_steps=1,
                           eval_every=2, eval_batches=2, checkpoint_every=2, device="cpu")
    files = TrainFiles(log=str(tmp_path / "loss.csv"), val_log=str(tmp_path / "val.csv"),
                       checkpoint_dir=str(out / "checkpoint"))
    run_student(config, str(small_tokens), str(out), None, files)
    with open(tmp_path / "val.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert int(last["step"]) == 2 and int(last["val_blocks"]) == 8

    table = tmp_path / "metrics.md"
    result = run_evaluate(EvaluateConfig(batch_size=4, max_batches=2, latency_rounds=1, reference="student"),
                          str(small_tokens), {"student": str(out)}, str(tmp_path / "metrics.json"),
                          table_path=str(table), figures_dir=str(tmp_path / "figures"),
                          curves={"student": [str(tmp_path / "loss.csv"), str(tmp_path / "val.csv")]})
    metrics = result["models"]["student"]
    assert result["validation_blocks"] == 8
    assert metrics["val_loss"] == pytest.approx(float(last["val_loss"]), rel=1e-5)

    assert (out / "checkpoint").is_dir()
    everything = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert metrics["disk_bytes"] == (out / "model.safetensors").stat().st_size < everything / 2

    lines = table.read_text().splitlines()
    assert lines[0] == "Validation: 8 blocks of 32 tokens."
    header, rule, row = lines[2:]
    assert header.startswith("| model | val loss | perplexity | top-1 agreement | ECE |")
    assert rule.count("|") == header.count("|")
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "student" and cells[1] == f"{metrics['val_loss']:.4f}" and cells[3] == "1.000"
    assert cells[5] == f"{metrics['params']:,}" and cells[6] == f"{metrics['disk_bytes'] / 1e6:.2f}"
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == ["loss_by_position.svg", "reliability.svg", "training_loss.svg", "validation_loss.svg"]


def test_calibration_bins_are_the_ece_s_bins():
    from pipeline.evaluate import calibration_bins

    rng = np.random.default_rng(0)
    confidence, correct = rng.random(500), rng.random(500) < 0.6
    mean_confidence, accuracy, counts = calibration_bins(confidence, correct)
    assert counts.sum() == 500 and np.all(np.diff(mean_confidence) > 0)
    ece = float((counts * np.abs(accuracy - mean_confidence)).sum() / 500)
    assert ece == pytest.approx(expected_calibration_error(confidence, correct))


def test_figures_are_svg_files_with_one_line_per_model(tmp_path):
    """write_figures on known inputs: every file parses as SVG, every series is drawn with its points."""
    import xml.etree.ElementTree as ET

    from pipeline.evaluate import write_figures

    (tmp_path / "loss.csv").write_text("step,epoch,loss\n1,0,5.0\n2,0,4.5\n3,0,4.2\n")
    (tmp_path / "val.csv").write_text("step,val_loss,val_blocks\n2,4.8,8\n3,4.4,8\n")
    per_position = {"teacher": np.array([3.0, 2.5, 2.0]), "student": np.array([4.0, 3.5, 3.2])}
    calibration = {"teacher": (np.array([0.1, 0.5, 0.9]), np.array([0.1, 0.4, 0.95]), np.array([5, 5, 5])),
                   "student": (np.array([0.3, 0.7]), np.array([0.2, 0.6]), np.array([4, 6]))}
    paths = write_figures(tmp_path / "figures", per_position, calibration,
                          {"student": [str(tmp_path / "loss.csv"), str(tmp_path / "val.csv")]})
    names = {path.name for path in paths}
    assert names == {"loss_by_position.svg", "reliability.svg", "training_loss.svg", "validation_loss.svg"}
    expected = {"loss_by_position.svg": {"teacher": 3, "student": 3}, "reliability.svg": {"teacher": 3, "student": 2},
                "training_loss.svg": {"student": 3}, "validation_loss.svg": {"student": 2}}
    for name, series in expected.items():
        root = ET.parse(tmp_path / "figures" / name).getroot()  # valid XML, or this raises
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        lines = {e.get("data-name"): e.get("points").split() for e in root.iter("{http://www.w3.org/2000/svg}polyline")}
        assert {k: len(v) for k, v in lines.items()} == series, name
    # A falling loss is drawn falling: SVG's y grows downwards.
    root = ET.parse(tmp_path / "figures" / "training_loss.svg").getroot()
    ys = [float(p.split(",")[1]) for p in next(root.iter("{http://www.w3.org/2000/svg}polyline")).get("points").split()]
    assert ys[0] < ys[1] < ys[2]
