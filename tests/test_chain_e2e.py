"""The self-distillation chain (chain/dvc.yaml) for 2 generations through real DVC, smoke-sized."""

import json
import re

import pytest
import yaml

from pipeline.models import fingerprint_model_dir
from tests.dvc_project import ROOT, make_project, run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A copy of the project with the smoke params for both pipelines, after `dvc repro chain/dvc.yaml`."""
    repo = tmp_path_factory.mktemp("chain") / "project"
    params = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
    # Smaller still than the smoke profile: the chain is what is tested here, not the teacher.
    params["prepare"]["max_documents"] = 12
    params["teacher"].update(max_steps=6, eval_every=0)
    env = make_project(repo, params, {"chain/dvc.yaml": "chain/dvc.yaml",
                                      "chain/params.yaml": "chain/params.smoke.yaml"})
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
    # Only the main pipeline's `inputs` runs (always_changed, a few hashes); its outputs are unchanged.
    assert re.findall(r"Running stage '([^']+)'", log) == ["inputs"]
