"""The classification smoke profile through real DVC: prepare → teacher → cache → students → evaluate."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def test_classification_profile_repro_runs_every_stage(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / "params.classification.smoke.yaml", repo / "params.yaml")
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "smoke"], repo, env)
    log = run(["dvc", "repro"], repo, env)
    for stage in ("prepare", "teacher", "cache", "student", "student_ce", "evaluate"):
        assert f"Running stage '{stage}'" in log
    result = json.loads((repo / "metrics.json").read_text())
    assert result["task"] == "classification" and set(result["models"]) == {"teacher", "student", "student_ce"}
    for m in result["models"].values():
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1 and m["latency_ms_per_example"] > 0
    from pipeline.targets.reader import TargetsStore

    store = TargetsStore(repo / "data" / "targets.zarr")
    assert store.attrs["task"] == "classification" and store.group["topk_ids"].shape[1] == 1
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(repo / "models" / "student")
    assert student.config.num_labels == store.vocab_size
