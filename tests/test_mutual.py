"""Deep mutual learning: two tiny real students, each distilled from the other's current distribution."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelShape
from pipeline.training.objective import Objective
from pipeline.models import build_gpt2
from pipeline.student.mutual import MutualObjective

B, T, V = 2, 6, 30


@pytest.fixture
def pair():
    shape = ModelShape(n_layer=1, n_embd=16, n_head=2)
    return torch.nn.ModuleList([build_gpt2(shape, V, T, seed) for seed in (0, 1)])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_kd_term_is_computed_against_the_peer(pair, temperature):
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    parts = MutualObjective(Objective(vocab_size=V, alpha=0.4, temperature=temperature))(pair, {"input_ids": ids})
    first, second = (model(input_ids=ids).logits.detach().flatten(0, 1) / temperature for model in pair)

    def kl(teacher, student):  # dense KL(softmax(teacher) ‖ softmax(student)), mean over positions
        return F.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True,
                        reduction="batchmean").item()

    assert parts["kd"].item() == pytest.approx(kl(second, first), rel=1e-4)
    assert parts["peer_kd"].item() == pytest.approx(kl(first, second), rel=1e-4)
    assert parts["kd"].item() > 1e-4  # the two seeds really differ
    assert parts["loss"].item() == pytest.approx(parts["student_loss"].item() + parts["peer_loss"].item())


def test_each_student_gets_the_gradient_of_its_own_loss_only(pair):
    from pipeline.student.mutual import peer_targets

    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    objective = Objective(vocab_size=V, alpha=0.5, temperature=1.0)
    MutualObjective(objective)(pair, {"input_ids": ids})["loss"].backward()
    together = [[p.grad.clone() for p in student.parameters()] for student in pair]
    for me, peer in ((0, 1), (1, 0)):
        pair.zero_grad()
        # One student's loss alone, against the other's fixed full distribution: the peer gets no gradient.
        objective(pair[me], {"input_ids": ids, **peer_targets(pair[peer], ids, V)})["loss"].backward()
        for got, expected in zip(together[me], (p.grad for p in pair[me].parameters())):
            torch.testing.assert_close(got, expected)
        assert all(p.grad is None for p in pair[peer].parameters())


def test_mutual_students_train_and_both_are_saved(kdcache, small_tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    out, log = tmp_path / "dml", tmp_path / "dml.csv"
    result = kdcache("student", "--tokens", small_tokens, "--mutual", "--out", out, "--log", log, "--alpha", 0.5,
                     "--max-steps", 3, "--n-layer", 1, "--n-embd", 16, "--n-head", 2, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    peer = tmp_path / "dml-peer"
    rows = list(csv.DictReader(log.open()))
    assert len(rows) == 3
    for row in rows:
        for key in ("loss", "ce", "kd", "peer_loss", "peer_ce", "peer_kd"):
            assert math.isfinite(float(row[key])), key
    first, second = (AutoModelForCausalLM.from_pretrained(d) for d in (out, peer))
    assert not torch.equal(first.lm_head.weight, second.lm_head.weight)  # seeds s and s + 1
    info = json.loads((out / "kdcache.json").read_text())
    assert info["mutual_peer"] == str(peer) and info["config"]["seed"] + 1 == \
        json.loads((peer / "kdcache.json").read_text())["config"]["seed"]


def test_mutual_refuses_targets_and_init(kdcache, small_tokens, small_targets, tmp_path):
    for extra, words in ((("--targets", small_targets), "leave out --targets"),
                         (("--init", tmp_path), "--init would start both")):
        result = kdcache("student", "--tokens", small_tokens, "--mutual", "--out", tmp_path / "x", *extra,
                         "--max-steps", 1)
        assert result.exit_code != 0 and words in result.output, result.output
        assert "Traceback" not in result.output
        assert not (tmp_path / "x").exists()
