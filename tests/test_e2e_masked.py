"""The masked-LM smoke profile through real DVC: prepare → teacher → cache → students → evaluate."""

import pytest

from tests.dvc_project import repro_profile

pytestmark = pytest.mark.e2e


def test_masked_profile_repro_runs_every_stage(tmp_path):
    repo = tmp_path / "project"
    result = repro_profile(repo, "params.masked.smoke.yaml")
    assert result["task"] == "masked" and set(result["models"]) == {"teacher", "student", "student_ce"}
    for m in result["models"].values():
        assert 0 <= m["accuracy"] <= 1 and m["perplexity"] > 1 and 0 <= m["top1_agreement"] <= 1
    table = (repo / "metrics.md").read_text()
    assert table.count("| student") == 2 and "accuracy" in table and "perplexity" in table
    from pipeline.data.tokens import TokenStore
    from pipeline.targets.reader import TargetsStore

    tokens = TokenStore(repo / "data" / "tokens")
    store = TargetsStore(repo / "data" / "targets.zarr")
    assert store.attrs["task"] == "masked" and store.group["topk_ids"].shape[1] == tokens.meta["mask_count"] == 5
    from transformers import AutoModelForMaskedLM

    student = AutoModelForMaskedLM.from_pretrained(repo / "models" / "student")
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == 32  # every other of 2
