"""The pipelines of teacher-made training data through real DVC, smoke-sized, in one project: the
self-distillation chain (chain/dvc.yaml, 3 generations) and sequence-level KD (seqkd/dvc.yaml)."""

import csv
import json
import re

import pytest
import yaml

from pipeline.data.tokens import TokenStore
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
                                      "chain/params.yaml": "chain/params.smoke.yaml",
                                      "seqkd/dvc.yaml": "seqkd/dvc.yaml",
                                      "seqkd/params.yaml": "seqkd/params.smoke.yaml"})
    log = run(["dvc", "repro", "chain/dvc.yaml"], repo, env)
    return repo, env, log


def test_each_generation_distils_the_previous_one(chain):
    repo, _, log = chain
    for stage in ("prepare", "teacher", *(f"{step}@gen{g}" for g in (1, 2, 3) for step in ("cache", "student")),
                  "evaluate"):
        assert f"Running stage '{stage}'" in log or f"Running stage 'chain/dvc.yaml:{stage}'" in log, stage
    assert "student_ce" not in log  # the main pipeline's students are not part of the chain
    teachers = {gen: json.loads((repo / "chain" / "data" / f"{gen}.zarr" / "zarr.json").read_text())
                ["attributes"]["teacher_fingerprint"] for gen in ("gen1", "gen2", "gen3")}
    assert teachers["gen1"] == fingerprint_model_dir(repo / "models" / "teacher")
    assert teachers["gen2"] == fingerprint_model_dir(repo / "chain" / "models" / "gen1")
    assert teachers["gen3"] == fingerprint_model_dir(repo / "chain" / "models" / "gen2")


def test_every_generation_is_in_one_metrics_table(chain):
    repo, env, _ = chain
    metrics = json.loads((repo / "chain" / "metrics.json").read_text())["models"]
    assert list(metrics) == ["gen0", "gen1", "gen2", "gen3"]
    assert metrics["gen0"]["top1_agreement"] == 1.0
    for gen in ("gen1", "gen2", "gen3"):
        assert metrics[gen]["val_loss"] > 0 and 0 <= metrics[gen]["top1_agreement"] <= 1
        assert (repo / "chain" / "plots" / f"{gen}_val_loss.csv").stat().st_size > 0
    table = run(["dvc", "metrics", "show", "chain/metrics.json"], repo, env)
    assert "gen3" in table and "val_loss" in table
    # One row per generation, in order, with the same numbers: the plot of a metric by generation.
    with open(repo / "chain" / "plots" / "by_generation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["index"], row["model"]) for row in rows] == [("0", "gen0"), ("1", "gen1"), ("2", "gen2"), ("3", "gen3")]
    assert [float(row["val_loss"]) for row in rows] == [metrics[g]["val_loss"] for g in metrics]
    plots = json.loads(run(["dvc", "plots", "show", "--json", "chain/dvc.yaml"], repo, env))["data"]
    by_generation = json.dumps(plots["Validation loss by generation (gen0 is the teacher)"])
    assert '"gen3"' in by_generation and '"val_loss"' in by_generation


def test_a_second_repro_reuses_every_generation(chain):
    repo, env, _ = chain
    log = run(["dvc", "repro", "chain/dvc.yaml"], repo, env)
    # Only the main pipeline's `inputs` runs (always_changed, a few hashes); its outputs are unchanged.
    assert re.findall(r"Running stage '([^']+)'", log) == ["inputs"]


@pytest.fixture(scope="module")
def seqkd(chain):
    """The same project after `dvc repro seqkd/dvc.yaml` (its prepare, teacher and cache are up to date)."""
    repo, env, _ = chain
    return repo, env, run(["dvc", "repro", "seqkd/dvc.yaml"], repo, env)


def test_students_learn_from_the_teachers_text(seqkd):
    repo, env, log = seqkd
    ran = re.findall(r"Running stage '([^']+)'", log)
    assert "cache" in ran  # the main pipeline's capture (not needed by the chain) serves `original`
    for stage in ("generate", "mix", "cache@generated", "cache@mixed", "student@original", "student@generated",
                  "student@mixed", "evaluate"):
        assert stage in ran or f"seqkd/dvc.yaml:{stage}" in ran, stage
    generated = TokenStore(repo / "seqkd" / "data" / "generated")
    assert generated.meta["generated"]["teacher_fingerprint"] == fingerprint_model_dir(repo / "models" / "teacher")
    assert generated.num_rows("train") == 32  # prompts x (8 + 56 tokens) = 32 blocks of 64
    mixed = TokenStore(repo / "seqkd" / "data" / "mixed")
    assert mixed.num_rows("train") == TokenStore(repo / "data" / "tokens").num_rows("train") + 32
    metrics = json.loads((repo / "seqkd" / "metrics.json").read_text())["models"]
    assert list(metrics) == ["teacher", "original", "generated", "mixed"]
    assert all(m["val_loss"] > 0 for m in metrics.values())
    with open(repo / "seqkd" / "plots" / "by_data.csv", newline="") as f:
        assert [row["model"] for row in csv.DictReader(f)] == list(metrics)
