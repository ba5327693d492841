"""The self-distillation chain (chain/dvc.yaml) for 2 generations through real DVC, smoke-sized."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.models import fingerprint_model_dir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A copy of the project with the smoke params for both pipelines, after `dvc repro chain/dvc.yaml`."""
    repo = tmp_path_factory.mktemp("chain") / "project"
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
    # Smaller still than the smoke profile: the chain is what is tested here, not the teacher.
    params["prepare"]["max_documents"] = 12
    params["teacher"].update(max_steps=6, eval_every=0)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "chain").mkdir()
    shutil.copy(ROOT / "chain" / "dvc.yaml", repo / "chain")
    shutil.copy(ROOT / "chain" / "params.smoke.yaml", repo / "chain" / "params.yaml")
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "smoke"], repo, env)
    log = run(["dvc", "repro", "chain/dvc.yaml"], repo, env)
    return repo, env, log


def test_each_generation_distils_the_previous_one(chain):
    repo, _, log = chain
    for stage in ("prepare", "teacher", "cache@gen1", "student@gen1", "cache@gen2", "student@gen2", "evaluate"):
        assert f"Running stage '{stage}'" in log or f"Running stage 'chain/dvc.yaml:{stage}'" in log, stage
    assert "student_ce" not in log  # the main pipeline's students are not part of the chain
    teachers = {gen: json.loads((repo / "chain" / "data" / f"{gen}.zarr" / "zarr.json").read_text())
                ["attributes"]["teacher_fingerprint"] for gen in ("gen1", "gen2")}
    assert teachers["gen1"] == fingerprint_model_dir(repo / "models" / "teacher")
    assert teachers["gen2"] == fingerprint_model_dir(repo / "chain" / "models" / "gen1")


def test_every_generation_is_in_one_metrics_table(chain):
    repo, env, _ = chain
    metrics = json.loads((repo / "chain" / "metrics.json").read_text())["models"]
    assert set(metrics) == {"gen0", "gen1", "gen2"}
    assert metrics["gen0"]["top1_agreement"] == 1.0
    for gen in ("gen1", "gen2"):
        assert metrics[gen]["val_loss"] > 0 and 0 <= metrics[gen]["top1_agreement"] <= 1
        assert (repo / "chain" / "plots" / f"{gen}_val_loss.csv").stat().st_size > 0
    table = run(["dvc", "metrics", "show", "chain/metrics.json"], repo, env)
    assert "gen2" in table and "val_loss" in table


def test_a_second_repro_reuses_every_generation(chain):
    repo, env, _ = chain
    log = run(["dvc", "repro", "chain/dvc.yaml"], repo, env)
    ran = [line for line in log.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'inputs':"], ran  # `inputs` always runs (a few seconds); nothing else
