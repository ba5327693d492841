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

from pipeline.errors import KdcacheError
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore, decode_rows
from pipeline.tokens import TokenStore


class BlockStream(IterableDataset):
    """Yields dicts: input_ids (T,) int64, row () int64, and decoded target arrays for that row.

    targets: a targets store over the same split, or a list of them (one per teacher; they must share
    rows_per_shard), or None for tokens only. Arrays of store i are keyed fmt.teacher_key(name, i).
    target_names: which stored arrays to read (default: all), or one such list per store.
    """

    def __init__(self, tokens: str, split: str = "train", targets: str | list[str] | None = None,
                 target_names: list | None = None, rows_per_shard: int = 256,
                 shuffle_buffer: int = 256, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.tokens_path, self.split = str(tokens), split
        paths = [] if targets is None else targets if isinstance(targets, (list, tuple)) else [targets]
        self.targets_paths = [str(t) for t in paths]
        if target_names is None or (target_names and isinstance(target_names[0], str)):
            target_names = [target_names] * len(self.targets_paths)
        self.target_names = list(target_names)
        self.shuffle_buffer, self.seed, self.rank, self.world_size = shuffle_buffer, seed, rank, world_size
        self.epoch = 0
        rows = TokenStore(tokens).num_rows(split)
        per_shard = {int(TargetsStore(t).attrs["rows_per_shard"]) for t in self.targets_paths}
        if len(per_shard) > 1:
            raise KdcacheError(f"targets stores {self.targets_paths} have different rows_per_shard "
                               f"{sorted(per_shard)}; capture them with the same --rows-per-shard.")
        rows_per_shard = per_shard.pop() if per_shard else rows_per_shard
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
        stores = [TargetsStore(t) for t in self.targets_paths]
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        buffer: list[dict] = []
        for start, stop in self.my_shards(worker, num_workers):
            ids = torch.from_numpy(blocks[start:stop].astype(np.int64))
            targets = {fmt.teacher_key(name, i): t
                       for i, (store, names) in enumerate(zip(stores, self.target_names))
                       for name, t in decode_rows(store.read_rows(start, stop, names), store.attrs).items()}
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
