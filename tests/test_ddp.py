"""Data-parallel students under torchrun (2 CPU ranks, gloo) against one process with the same global batch."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
ARGS = ("--n-layer", 1, "--n-embd", 32, "--n-head", 2, "--batch-size", 16, "--max-steps", STEPS,
        "--warmup-steps", 3, "--lr", 3e-3, "--alpha", 0.5, "--shuffle-buffer", 32, "--device", "cpu")


def torchrun(*args, nproc=2):
    """`kdcache ARGS` as `nproc` ranks; PYTHONPATH makes the children import this checkout."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--",
           str(Path(sys.executable).parent / "kdcache"), *map(str, args)]  # "--": see docs/DDP.md
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def losses(path):
    with open(path) as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(kdcache, small_tokens, small_targets, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    common = ("student", "--tokens", small_tokens, "--targets", small_targets, *ARGS)
    one = kdcache(*common, "--out", root / "one", "--log", root / "one.csv")
    assert one.exit_code == 0, one.output
    two = torchrun(*common, "--out", root / "two", "--log", root / "two.csv", "--checkpoint-every", 10)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    return root, two


def test_two_ranks_follow_the_single_process_loss_curve(runs):
    """Same init, same global batch, same rows per epoch; only which rows share a step differs.

    Measured here: step 1 within 0.03%, the mean of the last third (10 steps) within 0.4%; two
    one-process runs that differ only in their shuffle buffer (the same kind of difference) end
    0.15-0.4% apart. The bounds, 1% and 1.5%, leave room for other CPUs' arithmetic, and still fail
    if the ranks trained on the wrong share of the batch (a 2x learning-rate or batch error moves the
    curve by far more).
    """
    root, _ = runs
    one, two = losses(root / "one.csv"), losses(root / "two.csv")
    assert len(one) == len(two) == STEPS
    assert two[0] == pytest.approx(one[0], rel=0.01)
    tail = STEPS // 3
    assert sum(two[-tail:]) / tail == pytest.approx(sum(one[-tail:]) / tail, rel=0.015)
    assert two[-1] < two[0] - 0.5  # it did learn


@pytest.fixture(scope="module")
def shards_of_8(kdcache, small_tokens, small_teacher, tmp_path_factory):
    """The small capture again in shards of 8 rows: one rank's share of a 16-block global batch."""
    out = tmp_path_factory.mktemp("ddp") / "targets.zarr"
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", out, "--top-k", 8,
                     "--rows-per-shard", 8, "--rows-per-chunk", 8)
    assert result.exit_code == 0, result.output
    return out


def test_two_ranks_equal_one_process_when_they_see_the_same_rows(kdcache, small_tokens, shards_of_8, tmp_path):
    """Without shuffling and with 8-row shards, step k of one process takes shards 2k and 2k+1 of the
    epoch's permutation, and rank r of two takes shard 2k+r: the same 16 rows. DDP's averaged
    gradient is then the one-process gradient (up to summation order), so losses and weights match."""
    steps, shards = 6, 20  # 157 rows: 19 full shards and a short one, which must come after the compared steps
    seed = next(s for s in range(100)
                if list(np.random.default_rng([s, 0]).permutation(shards)).index(shards - 1) >= 2 * steps)
    common = ("student", "--tokens", small_tokens, "--targets", shards_of_8, *ARGS, "--max-steps", steps,
              "--shuffle-buffer", 1, "--seed", seed)
    one = kdcache(*common, "--out", tmp_path / "one", "--log", tmp_path / "one.csv")
    assert one.exit_code == 0, one.output
    two = torchrun(*common, "--out", tmp_path / "two", "--log", tmp_path / "two.csv")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert losses(tmp_path / "two.csv") == pytest.approx(losses(tmp_path / "one.csv"), rel=1e-5)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    # atol: the attention key biases have no true gradient (softmax ignores a shift), so Adam turns
    # rounding noise into updates; they drift ~1e-6 apart, every other weight ~1e-8.
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def test_rank_zero_alone_writes_and_the_model_loads(runs):
    from transformers import AutoModelForCausalLM

    root, result = runs
    assert result.stdout.count("student -> ") == 1  # one report, from rank 0
    model = AutoModelForCausalLM.from_pretrained(root / "two")
    assert model.config.n_layer == 1
    assert sorted(p.name for p in (root / "two" / "checkpoint").iterdir()) == ["run.json", "state.pt"]
    assert '"world_size": 2' in (root / "two" / "checkpoint" / "run.json").read_text()


def test_global_batch_must_split_evenly_over_ranks(small_tokens, small_targets, tmp_path):
    result = torchrun("student", "--tokens", small_tokens, "--targets", small_targets, *ARGS,
                      "--batch-size", 15, "--out", tmp_path / "odd")
    assert result.returncode != 0
    assert "batch_size 15 is the global batch and must divide evenly over 2 ranks" in result.stderr
    assert not (tmp_path / "odd").exists()


def test_default_teacher_trains_on_two_ranks(small_tokens, tmp_path):
    from pipeline.teacher.load import load_teacher

    result = torchrun("teacher", "--tokens", small_tokens, "--out", tmp_path / "teacher", "--n-layer", 1,
                      "--n-embd", 32, "--n-head", 2, "--max-steps", 3, "--batch-size", 8,
                      "--log", tmp_path / "loss.csv")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("teacher default -> ") == 1
    _, info = load_teacher(tmp_path / "teacher")
    assert info["source"] == "default" and len(losses(tmp_path / "loss.csv")) == 3


def test_two_ranks_capture_one_store_that_decodes_as_one_process_wrote_it(small_tokens, small_teacher,
                                                                          small_targets, tmp_path):
    """Rank r writes shards r, r + 2, ...; kill-and-resume under two ranks as well (shards 1 and 2's
    records lost, `complete` not written)."""
    import zarr

    from pipeline.targets import format as fmt
    from pipeline.targets.reader import TargetsStore

    out = tmp_path / "two.zarr"
    args = ("cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", out, "--top-k", 8,
            "--batch-size", 64, "--rows-per-shard", 32, "--rows-per-chunk", 8, "--device", "cpu")
    result = torchrun(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone reports

    def same_as_one_process():
        two, one = TargetsStore(out), TargetsStore(small_targets)
        assert two.records == one.records and two.bad_shards() == []
        for name in one.array_names():
            assert np.array_equal(two.read_rows(0, one.rows, [name])[name], one.read_rows(0, one.rows, [name])[name])

    same_as_one_process()
    group = zarr.open_group(out, mode="r+")
    group.update_attributes({"complete": False})
    for index in (1, 2):
        del group[fmt.RECORDS][fmt.record_name(index)]
    result = torchrun(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming: 3 of 5 shards done" in result.stdout + result.stderr
    same_as_one_process()
    # Only rank 1 has shards left (1 and 3): rank 0, which logs, still counts them to the total.
    group.update_attributes({"complete": False})
    for index in (1, 3):
        del group[fmt.RECORDS][fmt.record_name(index)]
    result = torchrun(*args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    bars = [line for line in result.stderr.splitlines() if line.startswith("capture:")]
    assert bars and "100%" in bars[-1] and "2.05k/2.05k" in bars[-1], bars  # 2 shards x 32 rows x 32 tokens
    same_as_one_process()
