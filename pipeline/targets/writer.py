"""Sharded, resumable writer of the targets store.

A shard (rows_per_shard rows of every array) is written whole, then recorded in the group
attributes with per-array checksums. `complete` is set only after the last shard. A re-run with the
same identity skips recorded shards; a store with a different identity is stale and is rewritten.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import KdcacheError
from pipeline.targets import format as fmt


def checksum(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:32]


class TargetsWriter:
    def __init__(self, path: str | Path, identity: dict, array_specs: dict[str, tuple[tuple, str]]):
        """identity: the IDENTITY_KEYS attributes; array_specs: name -> (per-row shape, dtype)."""
        self.path = Path(path)
        identity = {**fmt.IDENTITY_DEFAULTS, **identity}
        if set(identity) != set(fmt.IDENTITY_KEYS):
            raise ValueError(f"identity keys {sorted(identity)} differ from format.IDENTITY_KEYS")
        self.identity = identity
        rows, per_chunk, per_shard = identity["rows"], identity["rows_per_chunk"], identity["rows_per_shard"]
        self.ranges = fmt.shard_ranges(rows, per_shard)
        self.group = self._open_or_create(array_specs, rows, per_chunk, per_shard)
        self.done: dict = dict(self.group.attrs.get("shards", {}))

    def _open_or_create(self, array_specs, rows, per_chunk, per_shard) -> zarr.Group:
        if (self.path / "zarr.json").exists():
            attrs = dict(zarr.open_group(self.path, mode="r").attrs)
            if attrs.get("format") != fmt.FORMAT_NAME:
                raise KdcacheError(f"{self.path} exists and is not a kdcache targets store; "
                                   f"choose another --out or delete it.")
            if fmt.identity_of(attrs) == self.identity:
                return zarr.open_group(self.path, mode="r+")
            print(f"[cache] {self.path} holds a capture with other settings or inputs; rewriting it.")
            shutil.rmtree(self.path)
        elif self.path.exists() and any(self.path.iterdir()):
            raise KdcacheError(f"{self.path} exists, is not empty and is not a targets store; "
                               f"choose another --out or delete it.")
        group = zarr.open_group(self.path, mode="w", attributes={**self.identity, "shards": {},
                                                                 "complete": False})
        for name, (row_shape, dtype) in array_specs.items():
            group.create_array(name, shape=(rows, *row_shape), dtype=dtype,
                               chunks=(per_chunk, *row_shape), shards=(per_shard, *row_shape),
                               compressors=[fmt.compressor_for(dtype)], fill_value=0)
        return group

    def pending(self) -> list[int]:
        """Indices of shards not yet written."""
        return [i for i in range(len(self.ranges)) if str(i) not in self.done]

    def write_shard(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        start, stop = self.ranges[index]
        sums = {}
        for name, data in arrays.items():
            if data.shape[0] != stop - start:
                raise ValueError(f"shard {index}: {name} has {data.shape[0]} rows, expected {stop - start}")
            self.group[name][start:stop] = data
            sums[name] = checksum(data)
        self.done[str(index)] = sums
        self.group.attrs["shards"] = self.done  # recorded only after every array of the shard is on disk

    def finish(self) -> None:
        if self.pending():
            raise RuntimeError(f"cannot finish: shards {self.pending()} were never written")
        self.group.attrs["complete"] = True
