"""The reader process: the loader's own batches, handed over in shared memory; its errors and its end."""

import multiprocessing
import shutil
import subprocess
import sys
import time

import pytest
import torch

from pipeline.config import StudentConfig
from pipeline.student import run_student
from pipeline.targets import format as fmt
from pipeline.training.loader import BlockStream, make_loader
from pipeline.training.shared_batches import SharedBatches
from test_resume import read_csv


def test_the_reader_process_gives_the_loaders_batches(tiny_tokens, store_path):
    stream = BlockStream(str(tiny_tokens.path), "train", str(store_path), shuffle_buffer=6, seed=1)
    stream.set_epoch(2)
    expected = [{name: t.clone() for name, t in batch.items()} for batch in make_loader(stream, 5)]
    got = 0
    for batch, want in zip(SharedBatches(stream, 5), expected, strict=True):
        assert batch.keys() == want.keys()
        for name in want:  # read before the next batch is asked for: the slot is reused after that
            assert torch.equal(batch[name], want[name]), name
        assert torch.equal(batch[fmt.TAIL_LOGMASS][:, 0].long(), batch["row"])  # still joined
        got += 1
    assert got == stream.batches_per_epoch(5, 0) and len(expected[-1]["row"]) < 5  # a partial batch at the end


def test_an_error_in_the_reader_process_is_raised_in_training(tiny_tokens, tmp_path):
    tokens = tmp_path / "tokens"
    shutil.copytree(tiny_tokens.path, tokens)
    batches = SharedBatches(BlockStream(str(tokens), "train", None, shuffle_buffer=4), 4)
    next(iter(batches))  # an epoch starts: the slots are made from the first row
    for data in tokens.glob("train*"):  # the data goes before the next epoch
        data.unlink()
    with pytest.raises(Exception, match="train") as raised:
        next(iter(batches))
    assert any("reader process" in note for note in getattr(raised.value, "__notes__", [])), raised.value


def test_leaving_the_loop_early_stops_the_reader_process(tiny_tokens, store_path):
    stream = BlockStream(str(tiny_tokens.path), "train", str(store_path), shuffle_buffer=6)
    batches = iter(SharedBatches(stream, 3))
    next(batches)
    assert len(multiprocessing.active_children()) == 1
    batches.close()  # what dropping the iterator does
    assert multiprocessing.active_children() == []


def test_a_student_trains_the_same_with_either_reader(small_tokens, small_targets, tmp_path):
    """Same batches, same steps: the loss logs are equal, every part of every step."""
    logs = {}
    for reader in ("thread", "process"):
        config = StudentConfig(n_layer=1, n_embd=32, n_head=2, batch_size=8, max_steps=6, warmup_steps=2,
                               alpha=0.5, shuffle_buffer=8, reader=reader, device="cpu")
        out = tmp_path / reader
        run_student(config, str(small_tokens), str(out / "model"), str(small_targets), str(out / "loss.csv"))
        logs[reader] = read_csv(out / "loss.csv")
    assert len(logs["thread"]) == 6 and logs["process"] == logs["thread"]


def test_the_reader_process_ends_when_the_training_process_is_killed(tiny_tokens, store_path, tmp_path):
    """A SIGKILLed training process cannot stop its reader: the reader notices and ends by itself."""
    script = tmp_path / "train.py"
    script.write_text(
        "import multiprocessing, time\n"
        "from pipeline.training.loader import BlockStream\n"
        "from pipeline.training.shared_batches import SharedBatches\n"
        f"batches = iter(SharedBatches(BlockStream({str(tiny_tokens.path)!r}, 'train', {str(store_path)!r}), 2))\n"
        "next(batches)\n"
        "print(multiprocessing.active_children()[0].pid, flush=True)\n"
        "time.sleep(600)\n")
    training = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    reader = int(training.stdout.readline())
    assert pid_alive(reader)  # waiting for a slot: all four are full and the training process sleeps
    training.kill()
    training.wait()
    deadline = time.monotonic() + 30
    while pid_alive(reader) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(reader)


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
