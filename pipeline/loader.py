"""Stream token blocks, joined with their cached targets, shard by shard.

Each epoch visits shards in a seeded permutation; shards are dealt round-robin to (rank, worker)
pairs so no row is seen twice; rows pass through a bounded shuffle buffer. Memory is one shard per
worker plus the buffer, whatever the corpus size. Decoding runs in the DataLoader workers.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore, decode_rows
from pipeline.tokens import TokenStore


class BlockStream(IterableDataset):
    """Yields dicts: input_ids (T,) int64, row () int64, and decoded target arrays for that row.

    targets: path of a targets store over the same split, or None for tokens only.
    target_names: which stored arrays to read (default: all).
    """

    def __init__(self, tokens: str, split: str = "train", targets: str | None = None,
                 target_names: list[str] | None = None, rows_per_shard: int = 256,
                 shuffle_buffer: int = 256, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.tokens_path, self.split, self.targets_path = str(tokens), split, targets
        self.target_names = target_names
        self.shuffle_buffer, self.seed, self.rank, self.world_size = shuffle_buffer, seed, rank, world_size
        self.epoch = 0
        rows = TokenStore(tokens).num_rows(split)
        if targets is not None:
            rows_per_shard = int(TargetsStore(targets).attrs["rows_per_shard"])
        self.shards = fmt.shard_ranges(rows, rows_per_shard)
        self.num_rows = rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self, worker: int = 0, num_workers: int = 1) -> list[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        return [self.shards[i] for i in order[slot::slots]]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        blocks = TokenStore(self.tokens_path).blocks(self.split)
        store = TargetsStore(self.targets_path) if self.targets_path else None
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        buffer: list[dict] = []
        for start, stop in self.my_shards(worker, num_workers):
            ids = torch.from_numpy(blocks[start:stop].astype(np.int64))
            targets = decode_rows(store.read_rows(start, stop, self.target_names)) if store else {}
            for i in range(stop - start):
                item = {"input_ids": ids[i], "row": torch.tensor(start + i)}
                item.update({name: t[i] for name, t in targets.items()})
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


def make_loader(stream: BlockStream, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      prefetch_factor=4 if num_workers else None)
