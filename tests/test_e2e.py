"""The smoke profile through real DVC in a temporary git repository, then a `dvc exp run`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dvc_project import ROOT, make_project, run

pytestmark = pytest.mark.e2e


def new_project(repo: Path, params: str = "") -> tuple[Path, dict]:
    """A committed git repository holding the code, dvc.yaml, DVC config and the smoke params
    (with `params` appended: YAML that overrides keys)."""
    smoke = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
    for section, values in (yaml.safe_load(params) or {}).items():
        smoke[section].update(values)
    return repo, make_project(repo, smoke)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project (code, dvc.yaml, DVC config) with the smoke params, after `dvc repro`."""
    repo, env = new_project(tmp_path_factory.mktemp("e2e") / "project")
    log = run(["dvc", "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "repro"], repo, env)
    return repo, env, log


def test_repro_runs_every_stage_and_writes_metrics(project):
    repo, _, log = project
    for stage in ("prepare", "teacher", "cache", "student", "student_ce", "evaluate"):
        assert f"Running stage '{stage}'" in log
    metrics = json.loads((repo / "metrics.json").read_text())["models"]
    assert set(metrics) == {"teacher", "student", "student_ce"}
    for m in metrics.values():
        assert m["val_loss"] > 0 and m["params"] > 0 and m["latency_ms_per_token"] > 0
    assert metrics["teacher"]["top1_agreement"] == 1.0
    for plot in ("teacher_loss", "student_loss", "student_ce_loss", "eval_loss_by_position"):
        assert (repo / "plots" / f"{plot}.csv").stat().st_size > 0
    assert (repo / "metrics.md").read_text().count("| student") == 2  # student and student_ce rows
    live = json.loads((repo / "dvclive" / "student" / "metrics.json").read_text())  # DVCLive, as dvc.yaml asks
    assert live["step"] > 0 and live["loss"] > 0 and (repo / "dvclive/student/plots/metrics/loss.tsv").exists()
    assert sorted(p.name for p in (repo / "figures").iterdir()) == [
        "loss_by_position.svg", "reliability.svg", "training_loss.svg", "validation_loss.svg"]


def test_student_loads_with_from_pretrained(project):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo, _, _ = project
    model = AutoModelForCausalLM.from_pretrained(repo / "models" / "student")
    tokenizer = AutoTokenizer.from_pretrained(repo / "models" / "student")
    ids = torch.tensor([tokenizer("def main():")["input_ids"]])
    assert model(input_ids=ids).logits.shape[-1] >= len(tokenizer)


def test_inspect_and_verify_the_captured_store(project):
    repo, env, _ = project
    summary = json.loads(run(["kdcache", "inspect", "data/targets.zarr", "--json"], repo, env))
    assert summary["complete"] and summary["rows"] > 0 and summary["bytes_per_token"] > 0
    assert "hidden_layer_2" in summary["arrays"]
    assert "all" in run(["kdcache", "verify", "data/targets.zarr"], repo, env)


def test_exp_run_with_new_temperature_reuses_the_capture(project):
    repo, env, _ = project
    log = run(["dvc", "exp", "run", "-S", "student.temperature=3.0"], repo, env)
    assert "Running stage 'student'" in log and "Running stage 'evaluate'" in log
    for stage in ("prepare", "teacher", "cache", "student_ce"):
        assert f"Running stage '{stage}'" not in log


def test_queued_grid_of_students_reuses_the_committed_capture(project):
    """README's grid: with dvc.lock committed after the run (the fixture does as README says), each
    queued experiment checks the capture out of the DVC cache instead of running the teacher again."""
    repo, env, _ = project
    run(["dvc", "exp", "run", "--queue", "-S", "student.alpha=0.1,0.9"], repo, env)  # smoke: alpha 0.5
    log = run(["dvc", "exp", "run", "--run-all"], repo, env)
    assert log.count("Running stage 'student'") == 2 and log.count("Running stage 'evaluate'") == 2
    assert log.count("Stage 'cache' didn't change, skipping") == 2
    for stage in ("prepare", "teacher", "cache", "student_ce"):
        assert f"Running stage '{stage}'" not in log


def test_format_doc_example_reads_the_store_with_zarr_and_numpy_only(project):
    """docs/FORMAT.md's code, run as written in a fresh interpreter that never imports kdcache."""
    repo, env, _ = project
    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    example = "import numpy as np\n" + "".join(block.split("```")[0] for block in doc.split("```python\n")[1:])
    guard = "import sys\nsys.path = [p for p in sys.path if p not in ('', '.')]\n"
    check = "\nassert 'pipeline' not in sys.modules and ids.shape[-1] == attrs['top_k']\nprint('read ok')\n"
    result = subprocess.run([sys.executable, "-c", guard + example + check], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "read ok" in result.stdout, result.stderr


def test_a_local_corpus_is_a_dependency_of_prepare(tmp_path):
    """params.yaml names the corpus by path; the inputs stage makes its files a DVC dependency: a new
    file shows prepare as changed and re-runs it, an unchanged corpus does not."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    repo, env = new_project(tmp_path / "project", f"prepare: {{corpus: {corpus}, vocab_size: 300, block_size: 32}}")
    assert "Running stage 'prepare'" in run(["dvc", "repro", "prepare"], repo, env)
    assert "Stage 'prepare' didn't change, skipping" in run(["dvc", "repro", "prepare"], repo, env)
    (corpus / "doc3.txt").write_text("class A:\n    pass\n" * 40)
    run(["dvc", "repro", "--single-item", "inputs"], repo, env)
    status = run(["dvc", "status", "prepare"], repo, env)
    assert "data/inputs/corpus.json" in status and "modified" in status
    assert "Running stage 'prepare'" in run(["dvc", "repro", "prepare"], repo, env)
