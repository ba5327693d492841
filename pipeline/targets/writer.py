"""Sharded, resumable writer of the targets store, safe for several ranks writing disjoint shards.

A shard (rows_per_shard rows of every array) is written whole, then recorded by an object of its own
(`records/shard_NNNNNN`, format.record_name: its rows, per-array checksums and stats), so writers of
different shards never touch the same object and a kill loses at most unrecorded shards. `complete`
is set once, after every record exists. A re-run with the same identity skips recorded shards and
re-captures those whose arrays no longer match their checksums; a store with another identity is
refused unless `overwrite` (then deleted and started over). Stores of format versions before
RECORDS_SINCE keep their records in the group attributes: they are read as they are and, when
resumed, migrated (records written as objects first, then the attributes).
"""

from __future__ import annotations

import hashlib

import numpy as np
import zarr

from pipeline.errors import KdcacheError
from pipeline.targets import format as fmt
from pipeline.location import Location
from pipeline.targets.lock import LOCK_NAME


def checksum(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:32]


def forget_listings(group: zarr.Group) -> None:
    """Drop the object store's cached directory listings (s3fs and gcsfs keep them for the life of the
    process), so that records written since, by other ranks or processes, are seen. Local: none."""
    fs = getattr(group.store, "fs", None)
    if fs is not None:
        fs.invalidate_cache()


def read_records(group: zarr.Group, attrs: dict) -> dict[str, dict]:
    """Shard index (str) -> its record {"checksums": {array: sha256}, "stats": {...}, ...}, for every
    finished shard. A record that cannot be read (a torn write) counts as not finished."""
    if int(attrs.get("format_version", 0)) < fmt.RECORDS_SINCE:
        stats = attrs.get("shard_stats", {})
        return {index: {"checksums": sums, "stats": stats.get(index, {})}
                for index, sums in attrs.get("shards", {}).items()}
    try:
        records = group[fmt.RECORDS]
    except KeyError:
        return {}
    found = {}
    for name in records.group_keys():
        try:
            record = dict(records[name].attrs)
        except Exception:  # unreadable metadata: the shard is not recorded
            continue
        if "shard" in record and "checksums" in record:
            found[str(record["shard"])] = record
    return found


def bad_shards(group: zarr.Group, ranges: list[tuple[int, int]], recorded: dict, names=None) -> list[int]:
    """Shards with no record in `recorded` (read_records) or whose arrays on disk no longer match
    their recorded checksums. names: check only these arrays (default: every recorded one)."""
    bad = []
    for index, (start, stop) in enumerate(ranges):
        record = recorded.get(str(index))
        try:
            sums = record["checksums"]
            ok = all(checksum(group[name][start:stop]) == sums[name] for name in (sums if names is None else names))
        except Exception:  # no record, or an unreadable shard: a bad shard, whatever the codec raised
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


def identity_differences(stored: dict, wanted: dict) -> dict:
    """key -> (stored, wanted) for identity keys that differ; the format version may (it migrates)."""
    have = fmt.identity_of(stored)
    return {key: (have[key], wanted[key]) for key in fmt.IDENTITY_KEYS
            if key != "format_version" and have[key] != wanted[key]}


class TargetsWriter:
    def __init__(self, path: str | Location, identity: dict, array_specs: dict[str, tuple[tuple, str]],
                 overwrite: bool = False, create: bool = True):
        """identity: the IDENTITY_KEYS attributes; array_specs: name -> (per-row shape, dtype).

        overwrite: delete a store with another identity instead of refusing it. create=False: open a
        store another rank has just created or checked (no deletion, no repair; under torchrun).
        """
        self.location = path if isinstance(path, Location) else Location(path)
        self.path = self.location.text
        identity = {**fmt.IDENTITY_DEFAULTS, **identity}
        if set(identity) != set(fmt.IDENTITY_KEYS):
            raise ValueError(f"identity keys {sorted(identity)} differ from format.IDENTITY_KEYS")
        self.identity = identity
        rows, per_chunk, per_shard = identity["rows"], identity["rows_per_chunk"], identity["rows_per_shard"]
        self.ranges = fmt.shard_ranges(rows, per_shard)
        self.specs = array_specs
        if create:
            self.group = self._open_or_create(overwrite)
            self.done = read_records(self.group, dict(self.group.attrs))
            self._forget_corrupt_shards()
        else:
            self.group = zarr.open_group(self.location.url, mode="r+")
            self.done = read_records(self.group, dict(self.group.attrs))

    # --- opening ----------------------------------------------------------------------------------

    def _open_or_create(self, overwrite: bool) -> zarr.Group:
        location = self.location
        if location.exists("zarr.json"):
            attrs = dict(zarr.open_group(location.url, mode="r").attrs)
            if attrs.get("format") != fmt.FORMAT_NAME:
                raise KdcacheError(f"{location} exists and is not a kdcache targets store; "
                                   f"choose another --out or delete it.")
            differences = identity_differences(attrs, self.identity)
            if attrs.get("format_version") not in fmt.READABLE_VERSIONS:
                differences["format_version"] = (attrs.get("format_version"), fmt.FORMAT_VERSION)
            if differences and not overwrite:
                listed = "; ".join(f"{key}: {old!r} stored, {new!r} asked" for key, (old, new) in differences.items())
                raise KdcacheError(f"{location} holds a capture with other settings or inputs ({listed}). "
                                   f"Re-run with the stored settings to resume it, choose another --out, or "
                                   f"pass --overwrite to delete it and start over.")
            if differences:
                print(f"[cache] --overwrite: deleting {location} (it held a capture with other settings)")
            else:
                group = zarr.open_group(location.url, mode="r+")
                if not bad_unsharded(group, attrs.get("unsharded", {})):
                    self._migrate(group, attrs)
                    self._ensure_arrays(group)
                    return group
                # Every shard was computed with arrays (a basis) that no longer match: start over.
                print(f"[cache] unsharded arrays of {location} no longer match their checksums; rewriting it.")
            self._clear()
        elif [name for name in location.names() if name != LOCK_NAME]:
            raise KdcacheError(f"{location} exists, is not empty and is not a targets store; "
                               f"choose another --out or delete it.")
        # "a", not "w": "w" would delete the lock this capture holds (the store is empty but for it).
        group = zarr.open_group(location.url, mode="a", attributes={**self.identity, "complete": False})
        self._ensure_arrays(group)
        return group

    def _clear(self) -> None:
        """Delete the store's contents, keeping the lock this capture holds."""
        for name in self.location.names():
            if name != LOCK_NAME:
                self.location.delete(name)

    def _ensure_arrays(self, group: zarr.Group) -> None:
        """Create every array of the schema that is missing or has another shape or dtype (a capture
        killed between the group's metadata and its arrays); their shards then fail their checksums."""
        rows, per_chunk, per_shard = (self.identity[key] for key in ("rows", "rows_per_chunk", "rows_per_shard"))
        for name, (row_shape, dtype) in self.specs.items():
            try:
                array = group[name]
                if array.shape == (rows, *row_shape) and array.dtype == np.dtype(dtype):
                    continue
            except KeyError:
                pass
            group.create_array(name, shape=(rows, *row_shape), dtype=dtype, chunks=(per_chunk, *row_shape),
                               shards=(per_shard, *row_shape), compressors=[fmt.compressor_for(dtype)],
                               fill_value=0, overwrite=True)
        if fmt.RECORDS not in group:
            group.create_group(fmt.RECORDS)

    def _migrate(self, group: zarr.Group, attrs: dict) -> None:
        """An older store being resumed: its attribute records become record objects, then the
        attributes say the current version (a kill in between leaves the old store as it was)."""
        if int(attrs.get("format_version", 0)) >= fmt.RECORDS_SINCE:
            return
        records = group.require_group(fmt.RECORDS)
        for index, record in read_records(group, attrs).items():
            self._write_record(records, int(index), record["checksums"], record["stats"])
        kept = {key: value for key, value in attrs.items() if key not in ("shards", "shard_stats", "temperature")}
        group.attrs.put({**kept, **self.identity})
        print(f"[cache] {self.location}: format version {attrs.get('format_version')} -> {fmt.FORMAT_VERSION}")

    def _forget_corrupt_shards(self) -> None:
        """Shards recorded as written whose files changed since (disk errors, edits) are written again."""
        corrupt = [i for i in bad_shards(self.group, self.ranges, self.done) if str(i) in self.done]
        if corrupt:
            print(f"[cache] shards {corrupt} of {self.location} no longer match their checksums; re-capturing them.")
            self.group.update_attributes({"complete": False})  # before any record goes
            records = self.group[fmt.RECORDS]
            for index in corrupt:
                del records[fmt.record_name(index)]
                del self.done[str(index)]

    # --- writing ----------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the records (other ranks write theirs)."""
        forget_listings(self.group)
        self.done = read_records(self.group, dict(self.group.attrs))

    def recorded(self) -> set[int]:
        """Indices of the shards whose record objects exist now, by their names alone (one listing, no
        record read: for progress, not for trusting a shard)."""
        if int(self.group.attrs.get("format_version", 0)) < fmt.RECORDS_SINCE:
            return {int(index) for index in self.done}
        prefix = fmt.record_name(0).rstrip("0")
        forget_listings(self.group)
        return {int(name[len(prefix):]) for name in self.group[fmt.RECORDS].group_keys()
                if name.startswith(prefix) and name[len(prefix):].isdigit()}

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Indices of shards not yet recorded that fall to `rank` of `world_size` (r, r + N, ...)."""
        return [i for i in range(rank, len(self.ranges), world_size) if str(i) not in self.done]

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
        return {index: record.get("stats", {}) for index, record in self.done.items()}

    def _write_record(self, records: zarr.Group, index: int, sums: dict, stats: dict | None) -> dict:
        start, stop = self.ranges[index]
        record = {"shard": index, "rows": [start, stop], "checksums": sums, "stats": stats or {}}
        records.create_group(fmt.record_name(index), attributes=record, overwrite=True)
        return record

    def write_shard(self, index: int, arrays: dict[str, np.ndarray], stats: dict | None = None) -> None:
        """stats: JSON-able numbers about this shard, kept in its record so a resumed capture can total them."""
        start, stop = self.ranges[index]
        sums = {}
        for name, data in arrays.items():
            if data.shape[0] != stop - start:
                raise ValueError(f"shard {index}: {name} has {data.shape[0]} rows, expected {stop - start}")
            array = self.group[name]
            # Drop the old shard object first: zarr merges a write into the stored shard, and would
            # fail on a damaged shard index before writing a byte (the repair path).
            key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
            self.location.delete(f"{name}/{key}")
            array[start:stop] = data
            sums[name] = checksum(data)
        # Recorded only after every array of the shard is stored.
        self.done[str(index)] = self._write_record(self.group[fmt.RECORDS], index, sums, stats)

    def finish(self, attributes: dict | None = None) -> None:
        """Mark the store complete, together with `attributes` (summaries of the whole capture)."""
        self.refresh()
        if self.pending():
            raise RuntimeError(f"cannot finish: shards {self.pending()} were never written")
        self.group.update_attributes({**(attributes or {}), "complete": True})  # one metadata write
