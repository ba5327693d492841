"""Checkpoints and --resume: an interrupted run, resumed, equals the uninterrupted one."""

import csv

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import StudentConfig
from pipeline.student import run_student
from pipeline.errors import KdcacheError
from pipeline.training.loop import TrainFiles

# 32-row global batches over 157 rows and 2 loader workers: epochs of a few batches, so the resumed
# run continues mid-epoch, with the workers' round-robin rotated, and then crosses into a new epoch.
CONFIG = dict(n_layer=1, n_embd=32, n_head=2, batch_size=32, max_steps=8, warmup_steps=2, lr=3e-3,
              alpha=0.5, num_workers=2, shuffle_buffer=8, checkpoint_every=3, eval_every=2, eval_batches=2,
              device="cpu")


class Killed(Exception):
    pass


def kill_at(batch_number: int):
    """A stand-in for a kill: the run dies when it fetches this batch (1-based)."""
    seen = []

    def add_targets(batch):
        seen.append(1)
        if len(seen) == batch_number:
            raise Killed
        return batch

    return add_targets


def files(root, resume=False):
    return TrainFiles(str(root / "loss.csv"), str(root / "val.csv"), str(root / "checkpoint"), resume)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("loader, resumed", [({"num_workers": 2}, {}), ({"num_workers": 0}, {"reader": "thread"})],
                         ids=["two workers", "reader process, resumed with the thread"])
def test_killed_then_resumed_run_equals_the_uninterrupted_run(small_tokens, small_targets, tmp_path, loader,
                                                               resumed):
    config = StudentConfig(**{**CONFIG, **loader})
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_student(config, str(small_tokens), str(straight / "model"), str(small_targets), files(straight))
    with pytest.raises(Killed):  # dies fetching batch 5: steps 4 is lost, the checkpoint is at step 3
        run_student(config, str(small_tokens), str(broken / "model"), str(small_targets), files(broken),
                    add_targets=kill_at(5))
    assert [int(r["step"]) for r in read_csv(broken / "loss.csv")] == [1, 2, 3]  # logs as of the checkpoint
    run_student(StudentConfig(**{**CONFIG, **loader, **resumed}), str(small_tokens), str(broken / "model"),
                str(small_targets), files(broken, resume=True))

    losses = read_csv(straight / "loss.csv")
    assert [int(r["step"]) for r in losses] == list(range(1, 9))
    assert {int(r["epoch"]) for r in losses} == {0, 1}  # the run did cross an epoch boundary
    assert read_csv(broken / "loss.csv") == losses  # every step's loss parts, exactly
    assert read_csv(broken / "val.csv") == read_csv(straight / "val.csv")
    assert [int(r["step"]) for r in read_csv(straight / "val.csv")] == [2, 4, 6, 8]
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(broken / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_before_training(small_tokens, small_targets, tmp_path):
    config = StudentConfig(**{**CONFIG, "max_steps": 3})
    run_student(config, str(small_tokens), str(tmp_path / "model"), str(small_targets), files(tmp_path))
    other = StudentConfig(**{**CONFIG, "max_steps": 3, "lr": 0.01, "alpha": 0.7})
    with pytest.raises(KdcacheError, match=r"different run \(lr: checkpoint 0.003, now 0.01; alpha") as e:
        run_student(other, str(small_tokens), str(tmp_path / "model"), str(small_targets),
                    files(tmp_path, resume=True), add_targets=kill_at(1))  # training would die at once
    assert "max_steps" not in str(e.value)
    shorter = StudentConfig(**{**CONFIG, "max_steps": 2})
    with pytest.raises(KdcacheError, match="at step 3, beyond this run's 2 steps"):
        run_student(shorter, str(small_tokens), str(tmp_path / "model"), str(small_targets),
                    files(tmp_path, resume=True))
    with pytest.raises(KdcacheError, match="no checkpoint in"):
        run_student(config, str(small_tokens), str(tmp_path / "model"), str(small_targets),
                    files(tmp_path / "elsewhere", resume=True))


def test_cli_resume_extends_a_finished_run(kdcache, small_tokens, small_targets, tmp_path):
    args = ["student", "--tokens", small_tokens, "--targets", small_targets, "--out", tmp_path / "student",
            "--log", tmp_path / "loss.csv", "--n-layer", 1, "--n-embd", 32, "--n-head", 2, "--batch-size", 8,
            "--checkpoint-every", 2, "--device", "cpu"]
    result = kdcache(*args, "--max-steps", 3)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "student" / "checkpoint" / "run.json").exists()
    result = kdcache(*args, "--max-steps", 5, "--resume")
    assert result.exit_code == 0, result.output
    assert [int(r["step"]) for r in read_csv(tmp_path / "loss.csv")] == [1, 2, 3, 4, 5]
    result = kdcache(*args, "--max-steps", 5, "--resume", "--batch-size", 4)
    assert result.exit_code == 1 and "batch_size: checkpoint 8, now 4" in result.output
