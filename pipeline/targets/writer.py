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


def bad_shards(group: zarr.Group, ranges: list[tuple[int, int]], recorded: dict, names=None) -> list[int]:
    """Shards with no record in `recorded` (the `shards` attribute) or whose arrays on disk no longer
    match their recorded checksums. names: check only these arrays (default: every recorded one)."""
    bad = []
    for index, (start, stop) in enumerate(ranges):
        sums = recorded.get(str(index))
        try:
            ok = sums is not None and all(checksum(group[name][start:stop]) == sums[name]
                                          for name in (sums if names is None else names))
        except Exception:  # an unreadable shard is a bad shard, whatever the codec raised
            ok = False
        if not ok:
            bad.append(index)
    return bad


def bad_unsharded(group: zarr.Group, recorded: dict) -> list[str]:
    """Arrays not indexed by row (the `unsharded` attribute) that are missing or fail their checksum."""
    bad = []
    for name, expected in recorded.items():
        try:
            ok = checksum(group[name][...]) == expected
        except Exception:  # missing or unreadable
            ok = False
        if not ok:
            bad.append(name)
    return bad


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
        self._forget_corrupt_shards()

    def _open_or_create(self, array_specs, rows, per_chunk, per_shard) -> zarr.Group:
        if (self.path / "zarr.json").exists():
            attrs = dict(zarr.open_group(self.path, mode="r").attrs)
            if attrs.get("format") != fmt.FORMAT_NAME:
                raise KdcacheError(f"{self.path} exists and is not a kdcache targets store; "
                                   f"choose another --out or delete it.")
            same = fmt.identity_of(attrs) == self.identity
            if same and not bad_unsharded(zarr.open_group(self.path, mode="r"), attrs.get("unsharded", {})):
                return zarr.open_group(self.path, mode="r+")
            if same:  # every shard was computed with arrays (a basis) that no longer match: start over
                print(f"[cache] unsharded arrays of {self.path} no longer match their checksums; rewriting it.")
            else:
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

    def _forget_corrupt_shards(self) -> None:
        """Shards recorded as written whose files changed since (disk errors, edits) are written again."""
        corrupt = [i for i in bad_shards(self.group, self.ranges, self.done) if str(i) in self.done]
        if corrupt:
            print(f"[cache] shards {corrupt} of {self.path} no longer match their checksums; re-capturing them.")
            for index in corrupt:
                del self.done[str(index)]
            self.group.update_attributes({"complete": False, "shards": self.done})  # one metadata write

    def pending(self) -> list[int]:
        """Indices of shards not yet written (or found corrupt when the store was opened)."""
        return [i for i in range(len(self.ranges)) if str(i) not in self.done]

    @property
    def unsharded(self) -> dict:
        """name -> checksum of the arrays not indexed by row (written once, before shard 0)."""
        return dict(self.group.attrs.get("unsharded", {}))

    def write_unsharded(self, arrays: dict[str, np.ndarray], attributes: dict | None = None) -> None:
        """Write arrays not indexed by row (e.g. a hidden basis) whole, then record their checksums
        (and `attributes`) in the group attributes."""
        for name, data in arrays.items():
            self.group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape,
                                    compressors=[fmt.compressor_for(data.dtype)], overwrite=True)[...] = data
        sums = {**self.unsharded, **{name: checksum(data) for name, data in arrays.items()}}
        self.group.update_attributes({**(attributes or {}), "unsharded": sums})

    @property
    def shard_stats(self) -> dict:
        """Shard index (str) -> the `stats` recorded with it by write_shard."""
        return dict(self.group.attrs.get("shard_stats", {}))

    def write_shard(self, index: int, arrays: dict[str, np.ndarray], stats: dict | None = None) -> None:
        """stats: JSON-able numbers about this shard, kept per shard so a resumed capture can total them."""
        start, stop = self.ranges[index]
        sums = {}
        for name, data in arrays.items():
            if data.shape[0] != stop - start:
                raise ValueError(f"shard {index}: {name} has {data.shape[0]} rows, expected {stop - start}")
            self.group[name][start:stop] = data
            sums[name] = checksum(data)
        self.done[str(index)] = sums
        # Recorded only after every array of the shard is on disk.
        update = {"shards": self.done}
        if stats is not None:
            update["shard_stats"] = {**self.shard_stats, str(index): stats}
        self.group.update_attributes(update)

    def finish(self, attributes: dict | None = None) -> None:
        """Mark the store complete, together with `attributes` (summaries of the whole capture)."""
        if self.pending():
            raise RuntimeError(f"cannot finish: shards {self.pending()} were never written")
        self.group.update_attributes({**(attributes or {}), "complete": True})  # one metadata write
