"""Streaming: every row exactly once per epoch, a new order each epoch, rows joined with their targets."""

import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch

from pipeline.training.loader import BlockStream, make_loader
from pipeline.targets import format as fmt


def epoch_rows(stream, num_workers, epoch, check_join=None):
    stream.set_epoch(epoch)
    rows = []
    for batch in make_loader(stream, batch_size=5, num_workers=num_workers):
        rows.extend(batch["row"].tolist())
        if check_join:
            check_join(batch)
    return rows


def test_every_row_once_per_epoch_new_order_each_epoch_two_workers(tiny_tokens, store_path):
    blocks = tiny_tokens.blocks("train")
    stream = BlockStream(str(tiny_tokens.path), "train", str(store_path), shuffle_buffer=8, seed=3)

    def check_join(batch):
        rows = batch["row"]
        assert torch.equal(batch[fmt.TAIL_LOGMASS][:, 0].long(), rows)  # targets of the same row
        assert torch.equal(batch["input_ids"], torch.from_numpy(blocks[rows.numpy()].astype(np.int64)))

    first = epoch_rows(stream, 2, 0, check_join)
    second = epoch_rows(stream, 2, 1)
    n = tiny_tokens.num_rows("train")
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != second
    assert epoch_rows(stream, 2, 0) == first  # seeded: the same epoch replays the same order


def test_ranks_split_rows_without_overlap(tiny_tokens, store_path):
    seen = []
    for rank in range(2):
        stream = BlockStream(str(tiny_tokens.path), "train", str(store_path), seed=1, rank=rank, world_size=2)
        seen.append(set(epoch_rows(stream, 2, 0)))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(tiny_tokens.num_rows("train")))


def test_tokens_only_stream_covers_every_row(tiny_tokens):
    stream = BlockStream(str(tiny_tokens.path), "train", None, rows_per_shard=3, shuffle_buffer=4)
    rows = epoch_rows(stream, 0, 0)
    assert sorted(rows) == list(range(tiny_tokens.num_rows("train")))


def batch_rows(loader):
    return [batch["row"].tolist() for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 3])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(tiny_tokens, store_path, num_workers):
    """Workers interleave round-robin and run out unevenly; a resume after any batch continues the sequence."""
    stream = BlockStream(str(tiny_tokens.path), "train", str(store_path), shuffle_buffer=6, seed=2)
    loader = make_loader(stream, batch_size=3, num_workers=num_workers)
    stream.set_epoch(1)
    full = batch_rows(loader)
    assert len(full) == stream.batches_per_epoch(3, num_workers)
    if num_workers == 3:  # the case that needs the rotation: workers give different numbers of batches
        assert len(set(stream.worker_batches(3, 3))) > 1
    for done in sorted({1, len(full) // 2 + 1, len(full) - 1}):
        stream.start_epoch(1, done, 3, num_workers)
        rest = []
        for batch in loader:
            rest.append(batch["row"].tolist())
            assert torch.equal(batch[fmt.TAIL_LOGMASS][:, 0].long(), batch["row"])  # still joined
        assert rest == full[done:], done
    stream.set_epoch(1)
    assert batch_rows(loader) == full  # a plain epoch again afterwards


def test_row_order_needs_no_io_and_matches_the_stream(tiny_tokens, store_path):
    stream = BlockStream(str(tiny_tokens.path), "train", str(store_path), shuffle_buffer=5, seed=4)
    stream.set_epoch(3)
    assert [int(item["row"]) for item in stream] == list(stream.row_order())


def test_unequal_ranks_take_the_same_number_of_batches(tiny_tokens, store_path):
    streams = [BlockStream(str(tiny_tokens.path), "train", str(store_path), seed=1, rank=rank, world_size=3)
               for rank in range(3)]
    counts = [len(epoch_rows(stream, 0, 0)) for stream in streams]  # rows each rank really yields
    assert len(set(counts)) > 1  # the ranks do hold different numbers of rows
    assert [sum(s.worker_batches(2, 0)) for s in streams] == [-(-n // 2) for n in counts]
    assert {s.batches_per_epoch(2, 0) for s in streams} == {-(-min(counts) // 2)}


def test_tokens_only_stream_gives_every_rank_rows(tiny_tokens):
    n = tiny_tokens.num_rows("train")
    streams = [BlockStream(str(tiny_tokens.path), "train", None, rank=r, world_size=2) for r in range(2)]
    assert len(streams[0].shards) >= 2 * 8  # about 8 shards per rank, whatever the row count
    rows = [epoch_rows(s, 0, 0) for s in streams]
    assert all(rows) and not set(rows[0]) & set(rows[1]) and sorted(rows[0] + rows[1]) == list(range(n))


def test_decoding_in_one_thread_leaves_zarr_one_thread(store_path):
    """runtime.decode_in_one_thread (run_student calls it): zarr decompresses the shards a loader reads
    in one pool thread, instead of asyncio's default pool of up to cores + 4 beside the step."""
    code = ("import sys, threading\n"
            "from pipeline import runtime\n"
            "from pipeline.targets.reader import TargetsStore\n"
            "if sys.argv[1] == 'one':\n"
            "    runtime.decode_in_one_thread()\n"
            f"store = TargetsStore({str(store_path)!r})\n"
            "for start, stop in store.shard_ranges:\n"
            "    store.read_rows(start, stop)\n"
            "print(sum(t.name.startswith(('asyncio_', 'zarr_pool')) for t in threading.enumerate()))\n")
    counts = {setting: int(subprocess.run([sys.executable, "-c", code, setting], capture_output=True, text=True,
                                          check=True).stdout) for setting in ("default", "one")}
    assert counts == {"default": counts["default"], "one": 1} and counts["default"] > 1, counts


def test_older_shards_keep_only_their_rows_still_due(tiny_tokens, store_path, monkeypatch):
    """The shuffle buffer leaves rows of many shards due at once; once the reader moves on, each older
    shard is cut down to those rows (in the reader thread), so what is held stays near the buffer's size
    plus the shard being read, not every open shard whole. Rows still join their targets."""
    from pipeline.training import loader

    alive = weakref.WeakSet()
    peak = [0]

    class Counted(loader.HeldShard):
        def __init__(self, *args):
            super().__init__(*args)
            alive.add(self)

        def compact_in(self, reader):
            super().compact_in(reader)
            if self.compacting is not None:  # the copy done before the next row (the reader's speed aside)
                self.compacting.result()

        def take(self, row):
            peak[0] = max(peak[0], sum(len(shard.position) for shard in alive))
            return super().take(row)

    monkeypatch.setattr(loader, "HeldShard", Counted)
    buffer, per_shard = 12, 4
    stream = BlockStream(str(tiny_tokens.path), "train", str(store_path), shuffle_buffer=buffer, seed=5)
    rows = []
    for item in stream:
        rows.append(int(item["row"]))
        assert int(item[fmt.TAIL_LOGMASS][0]) == rows[-1]
    assert sorted(rows) == list(range(tiny_tokens.num_rows("train")))
    # Held whole, the open shards would hold (the shards with a row out and a row still due, in full):
    whole, given = 0, {}
    for row in rows:
        given[row // per_shard] = given.get(row // per_shard, 0) + 1
        whole = max(whole, per_shard * sum(1 for shard, k in given.items() if 0 < k < per_shard))
    # The rows still due (twice: a shard is copied once halved), the shard being taken and the one before it.
    bound = 2 * buffer + 2 * per_shard
    assert whole > bound >= peak[0]
