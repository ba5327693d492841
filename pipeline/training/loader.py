"""Stream token blocks, joined with their cached targets, shard by shard.

Each epoch visits shards in a seeded permutation; shards are dealt round-robin to (rank, worker)
pairs so no row is seen twice; rows pass through a bounded shuffle buffer. Memory is a few shards per
worker, whatever the corpus size: the shard being read, the one ahead, and the rows of older shards
still in the buffer (HeldShard). Reading and decoding run in a thread one shard ahead of the rows
being yielded (in each DataLoader worker, if there are workers). The training loop runs this loader
in a reader process by default (shared_batches.SharedBatches): the training process reads only
one row, to size the shared memory the batches arrive in.

The row order depends only on the seeds, never on the data, so it is computed without I/O. That is
what makes an exact resume cheap: `start_epoch(epoch, batches_done, ...)` skips the batches already
trained on and reads only the shards that still have rows to give.
"""

from __future__ import annotations

import random
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import runtime
from pipeline.data.alignment import ALIGNED
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore


class BlockStream(IterableDataset):
    """Yields dicts: input_ids (T,) int64, row () int64, and decoded target arrays for that row
    (topk attention as K entries and a fill value per row: format.decode_rows(..., sparse_attention=True)).

    targets: a targets store over the same split, or a list of them (one per teacher; they must share
    rows_per_shard), or None for tokens only. Arrays of store i are keyed fmt.teacher_key(name, i).
    target_names: which stored arrays to read (default: all), or one such list per store.
    rank, world_size: this process's share of the rows (default: from torch.distributed, else 0 of 1).
    rows_per_shard: rows read at once when there are no targets (a targets store sets its own).
    alignment: a cross-tokenizer student's (N, T) int64 teacher position per position of these tokens
    (data/alignment.py), flat in the one targets store's rows, or −1; its targets are read at those
    positions, in shards of rows_per_shard, with the ALIGNED mask beside them.
    """

    def __init__(self, tokens: str, split: str = "train", targets: str | list[str] | None = None,
                 target_names: list | None = None, rows_per_shard: int = 256,
                 shuffle_buffer: int = 256, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, alignment: np.ndarray | None = None):
        super().__init__()
        self.tokens_path, self.split = str(tokens), split
        paths = [] if targets is None else targets if isinstance(targets, (list, tuple)) else [targets]
        self.targets_paths = [str(t) for t in paths]
        self.alignment = alignment
        if target_names is None or (target_names and isinstance(target_names[0], str)):
            target_names = [target_names] * len(self.targets_paths)
        self.target_names = list(target_names)
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank = runtime.rank() if rank is None else rank
        self.world_size = runtime.world_size() if world_size is None else world_size
        self.epoch = 0
        self.skip = None  # (batches already trained on in this epoch, batch_size, num_workers)
        rows = TokenStore(tokens).num_rows(split)
        # Aligned targets are read by position, so these tokens' rows make the shards.
        per_shard = {int(TargetsStore(t).attrs["rows_per_shard"]) for t in self.targets_paths} if alignment is None \
            else set()
        if len(per_shard) > 1:
            raise KdcacheError(f"targets stores {self.targets_paths} have different rows_per_shard "
                               f"{sorted(per_shard)}; capture them with the same --rows-per-shard.")
        if not per_shard and self.world_size > 1:
            # Tokens only: shards are just a unit of reading, so make enough for every rank (about 8 each).
            rows_per_shard = max(1, min(rows_per_shard, -(-rows // (8 * self.world_size))))
        self.rows_per_shard = per_shard.pop() if per_shard else rows_per_shard
        self.shards = fmt.shard_ranges(rows, self.rows_per_shard)
        self.num_rows = rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skip = epoch, None

    def start_epoch(self, epoch: int, batches_done: int, batch_size: int, num_workers: int) -> None:
        """Resume `epoch` after its first `batches_done` batches (of this rank's loader, as built by
        make_loader(self, batch_size, num_workers)): the loader then yields exactly the rest."""
        self.epoch, self.skip = epoch, (batches_done, batch_size, num_workers)

    def my_shards(self, worker: int = 0, num_workers: int = 1, rank: int | None = None) -> list[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        rank = self.rank if rank is None else rank
        slot, slots = rank * num_workers + worker, self.world_size * num_workers
        return [self.shards[i] for i in order[slot::slots]]

    def row_order(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        """The rows one (rank, worker) yields this epoch, in order: the shuffle buffer run on row numbers."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        buffer = []
        for start, stop in self.my_shards(worker, num_workers):
            for row in range(start, stop):
                buffer.append(row)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def worker_batches(self, batch_size: int, num_workers: int, rank: int | None = None) -> list[int]:
        """Batches each DataLoader worker of `rank` yields this epoch (each ends with a partial one)."""
        rows = [sum(stop - start for start, stop in self.my_shards(w, max(1, num_workers), rank))
                for w in range(max(1, num_workers))]
        return [-(-n // batch_size) for n in rows]

    def batches_per_epoch(self, batch_size: int, num_workers: int) -> int:
        """Batches every rank can give this epoch: the fewest of any rank (all ranks take equal steps)."""
        return min(sum(self.worker_batches(batch_size, num_workers, r)) for r in range(self.world_size))

    def _resume_plan(self, num_workers: int) -> tuple[list[int], list[int]]:
        """(original worker played by each loader worker, rows it skips) for the current `skip`.

        A DataLoader takes batches from its workers round-robin, passing over exhausted ones. Count
        what each worker gave in the first `done` batches, then rotate the roles so that loader worker
        0 plays the worker whose turn came next: the round-robin then continues where it stopped.
        """
        workers = max(1, num_workers)
        if self.skip is None:
            return list(range(workers)), [0] * workers
        done, batch_size, planned_workers = self.skip
        if planned_workers != num_workers:
            raise KdcacheError(f"resume planned for {planned_workers} loader workers, the loader has {num_workers}.")
        left = self.worker_batches(batch_size, num_workers)
        if done > sum(left):
            raise KdcacheError(f"cannot resume after batch {done} of epoch {self.epoch}: it has {sum(left)}.")
        given, turn = [0] * workers, 0
        for _ in range(done):
            while left[turn] == 0:
                turn = (turn + 1) % workers
            given[turn] += 1
            left[turn] -= 1
            turn = (turn + 1) % workers
        active = [w for w in range(workers) if left[w] > 0]
        if not active:
            return [-1] * workers, [0] * workers
        while left[turn] == 0:
            turn = (turn + 1) % workers
        first = active.index(turn)
        roles = [active[(j + first) % len(active)] if j < len(active) else -1 for j in range(workers)]
        return roles, [given[w] * batch_size if w >= 0 else 0 for w in roles]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 0)
        roles, skips = self._resume_plan(num_workers)
        worker, skip = roles[worker], skips[worker]
        if worker < 0:  # nothing left for this loader worker after a resume
            return
        tokens = TokenStore(self.tokens_path)
        stores = [TargetsStore(t) for t in self.targets_paths]
        workers = max(1, num_workers)
        # Shards in the order their first remaining row is due. One thread reads them, each while the
        # shard before it is trained on, so reading and decoding overlap the step (one shard ahead).
        due = list(dict.fromkeys(row // self.rows_per_shard for n, row in enumerate(self.row_order(worker, workers))
                                 if n >= skip))
        following = dict(zip(due, due[1:]))
        given: dict[int, int] = {}  # shard index -> rows of it skipped or yielded so far
        held: dict[int, HeldShard] = {}  # shard index -> its decoded rows, while some are still due
        reading: dict[int, Future] = {}  # shard index -> its read, started ahead
        with ThreadPoolExecutor(max_workers=1) as reader:
            for n, row in enumerate(self.row_order(worker, workers)):
                shard = row // self.rows_per_shard
                start, stop = self.shards[shard]
                given[shard] = given.get(shard, 0) + 1
                done = given[shard] == stop - start
                if done:
                    del given[shard]
                if n < skip:  # trained on before the resume: no I/O for it
                    continue
                if shard not in held:  # its first remaining row is due
                    read = reading.pop(shard, None) or reader.submit(self.read_shard, tokens, stores, shard)
                    for older in held.values():  # the buffer has moved on: keep only their rows still due
                        older.compact_in(reader)
                    held[shard] = HeldShard(start, stop, read.result())
                    if shard in following:
                        reading[following[shard]] = reader.submit(self.read_shard, tokens, stores, following[shard])
                for each in held.values():
                    each.settle()
                yield {"row": torch.tensor(row), **held[shard].take(row)}
                if done:
                    del held[shard]  # all its rows are out: let the shard go

    def row_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of each tensor of a yielded row: read from the first row (rows are alike)."""
        first = {**TokenStore(self.tokens_path).rows(self.split, 0, 1),
                 **self.read_targets([TargetsStore(t) for t in self.targets_paths], 0, 1)}
        return {"row": ((), torch.int64), **{name: (tuple(t.shape[1:]), t.dtype) for name, t in first.items()}}

    def read_shard(self, tokens: TokenStore, stores: list[TargetsStore], shard: int) -> dict[str, torch.Tensor]:
        """Tokens and decoded targets of one shard's rows."""
        start, stop = self.shards[shard]
        return {**tokens.rows(self.split, start, stop), **self.read_targets(stores, start, stop)}

    def read_targets(self, stores: list[TargetsStore], start: int, stop: int) -> dict[str, torch.Tensor]:
        """The decoded targets of rows [start, stop): the stores' same rows, or the aligned positions."""
        if self.alignment is not None and stores:
            positions = self.alignment[start:stop]  # (R, T)
            targets = stores[0].read_positions(positions, self.target_names[0])
            return {ALIGNED: torch.from_numpy(positions >= 0), **targets}
        # topk attention as K entries + a fill per row: no T × T rows (Objective.teacher_attention).
        return {fmt.teacher_key(name, i): t for i, (store, names) in enumerate(zip(stores, self.target_names))
                for name, t in store.decode(store.read_rows(start, stop, names), sparse_attention=True).items()}


class HeldShard:
    """A decoded shard's rows while some are still due. The shuffle buffer yields a shard's last rows
    long after its first (with 256 rows each, about 8 shards are open at once), and attention rows make
    a shard tens to hundreds of MB: so once the reader has moved on to a later shard, the rows still
    due are copied out of this one in the reader thread, and the whole shard's memory goes."""

    def __init__(self, start: int, stop: int, tensors: dict[str, torch.Tensor]):
        self.tensors, self.due = tensors, set(range(start, stop))
        self.position = {row: row - start for row in self.due}  # row -> its index in the tensors
        self.compacting: Future | None = None

    def settle(self) -> None:
        """Swap in the copy of the rows still due, once made (the shard's memory goes with the swap)."""
        if self.compacting is not None and self.compacting.done():
            self.tensors, self.position = self.compacting.result()
            self.compacting = None

    def take(self, row: int) -> dict[str, torch.Tensor]:
        """`row`'s tensors (views)."""
        self.due.discard(row)
        index = self.position[row]
        return {name: t[index] for name, t in self.tensors.items()}

    def compact_in(self, reader: ThreadPoolExecutor) -> None:
        """Copy the rows still due out, in `reader`, once that at least halves what is held. Rows taken
        before the copy is swapped in are in it too: it holds every row due when it started."""
        if self.compacting is None and 2 * len(self.due) <= len(self.position):
            rows = sorted(self.due)
            self.compacting = reader.submit(copy_rows, self.tensors, [self.position[row] for row in rows], rows)


def copy_rows(tensors: dict[str, torch.Tensor], indices: list[int], rows: list[int]):
    """(the tensors' rows at `indices`, copied; row -> its index in the copy): HeldShard's new state."""
    index = torch.tensor(indices)
    return {name: t.index_select(0, index) for name, t in tensors.items()}, {row: i for i, row in enumerate(rows)}


def make_loader(stream: BlockStream, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of `batch_size` rows; with workers, each batch comes from one worker, round-robin.

    Its own generator: creating the iterator draws a seed, which must not come from (and shift) the
    global torch RNG that a resumed run restores. Workers are not persistent because a resume changes
    each worker's plan.
    """
    generator = torch.Generator().manual_seed(stream.seed)
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      generator=generator)
