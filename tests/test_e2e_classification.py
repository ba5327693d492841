"""The classification smoke profile through real DVC: prepare → teacher → cache → students → evaluate."""

import json

import pytest

from tests.dvc_project import make_project, run

pytestmark = pytest.mark.e2e


def test_classification_profile_repro_runs_every_stage(tmp_path):
    repo = tmp_path / "project"
    env = make_project(repo, "params.classification.smoke.yaml")
    log = run(["dvc", "repro"], repo, env)
    for stage in ("prepare", "teacher", "cache", "student", "student_ce", "evaluate"):
        assert f"Running stage '{stage}'" in log
    result = json.loads((repo / "metrics.json").read_text())
    assert result["task"] == "classification" and set(result["models"]) == {"teacher", "student", "student_ce"}
    for m in result["models"].values():
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1 and m["latency_ms_per_example"] > 0
    table = (repo / "metrics.md").read_text()
    assert table.count("| student") == 2 and "macro-F1" in table and "perplexity" not in table
    assert sorted(p.name for p in (repo / "figures").iterdir()) == [  # no loss by position: one per row
        "reliability.svg", "training_loss.svg", "validation_loss.svg"]
    from pipeline.targets.reader import TargetsStore

    store = TargetsStore(repo / "data" / "targets.zarr")
    assert store.attrs["task"] == "classification" and store.group["topk_ids"].shape[1] == 1
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(repo / "models" / "student")
    assert student.config.num_labels == store.vocab_size
