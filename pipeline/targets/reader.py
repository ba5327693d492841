"""Read a targets store: open with checks, then read whole shards (the unit of streaming).

What the arrays are and how they decode is format.py's (`format.decode_rows`); this file opens the
store, answers questions about it, and refuses stores that do not belong to the run.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.errors import KdcacheError
from pipeline.targets import format as fmt
from pipeline.location import Location
from pipeline.targets.writer import bad_shards, bad_unsharded, forget_listings, read_records


def not_a_store_message(path: Path) -> str:
    """Why `path` is no targets store, naming what it is when kdcache wrote it (so that the fix is not
    `cache --out` into another stage's output)."""
    if (path / "meta.json").exists() and (path / "tokenizer").is_dir():
        return (f"{path} is a token store (written by `kdcache prepare`), not a targets store; give the "
                f"store `kdcache cache --out` wrote (data/targets.zarr in dvc.yaml).")
    if (path / "kdcache.json").exists() or (path / "config.json").exists():
        return (f"{path} is a model directory, not a targets store; give the store `kdcache cache --out` "
                f"wrote (data/targets.zarr in dvc.yaml).")
    if path.exists():
        return (f"{path} is not a targets store (no zarr.json); give the store `kdcache cache --out` wrote "
                f"(data/targets.zarr in dvc.yaml).")
    return f"{path} does not exist; run `kdcache cache --out {path}` first."


class TargetsStore:
    def __init__(self, path: str | Path | Location, require_complete: bool = True):
        """path: a local directory or an fsspec URL (s3://, memory://, ...)."""
        self.location = path if isinstance(path, Location) else Location(path)
        # A Path for a local store (callers join paths to it), the URL as given otherwise.
        self.path = Path(self.location.text) if self.location.local else self.location.text
        if not self.location.exists("zarr.json"):
            raise KdcacheError(not_a_store_message(self.path) if self.location.local else
                               f"{self.path} is not a targets store (no zarr.json); "
                               f"run `kdcache cache --out {self.path}` first.")
        self.group = zarr.open_group(self.location.url, mode="r")
        forget_listings(self.group)  # an earlier open in this process may have listed an older state
        self.attrs = dict(self.group.attrs)
        fmt.check_version(self.attrs, self.path)
        if require_complete and not self.attrs.get("complete"):
            done, total = len(self.records), len(self.shard_ranges)
            raise KdcacheError(f"{self.path} is an unfinished capture ({done}/{total} shards); re-run "
                               f"`kdcache cache` with the same settings to resume it.")

    @cached_property
    def records(self) -> dict[str, dict]:
        """Shard index (str) -> completion record (checksums, stats) of every finished shard."""
        return read_records(self.group, self.attrs)

    def missing_arrays(self) -> list[str]:
        """Arrays of the schema absent from the store (a capture killed before creating them)."""
        return [name for name in self.array_names() if name not in self.group]

    rows = property(lambda self: int(self.attrs["rows"]))
    top_k = property(lambda self: int(self.attrs["top_k"]))
    layers = property(lambda self: list(self.attrs["layers"]))
    vocab_size = property(lambda self: int(self.attrs["vocab_size"]))
    capture_temperature = property(lambda self: float(fmt.attribute(self.attrs, "capture_temperature")))

    @property
    def shard_ranges(self) -> list[tuple[int, int]]:
        return fmt.shard_ranges(int(self.attrs["rows"]), int(self.attrs["rows_per_shard"]))

    samples = property(lambda self: int(self.attrs["samples"]))
    top_p = property(lambda self: float(fmt.attribute(self.attrs, "top_p")))
    hidden_rank = property(lambda self: int(fmt.attribute(self.attrs, "hidden_rank")))  # 0: full width

    @property
    def hidden_width(self) -> int:
        """Last dimension of `hidden_layer_*`: the rank P of a low-rank store, else the teacher's D."""
        return self.hidden_rank or int(self.attrs["hidden_size"])

    def hidden_basis(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean (D,), basis (D, P)) float32 of a low-rank store: h ≈ mean + coefficients · basisᵀ."""
        basis_name, mean_name = fmt.hidden_basis_arrays(layer)
        return self.group[mean_name][...], self.group[basis_name][...]

    def topk_names(self) -> list[str]:
        """Arrays of the top-k targets (none when only sampled targets were captured)."""
        return fmt.signal_names(self.attrs, "topk")

    def sampled_names(self) -> list[str]:
        return fmt.signal_names(self.attrs, "sampled")

    def array_names(self) -> list[str]:
        return fmt.array_names(self.attrs)

    def decode(self, stored: dict[str, np.ndarray], sparse_attention: bool = False) -> dict[str, torch.Tensor]:
        """Arrays read from this store (read_rows) → tensors (see format.decode_rows)."""
        return fmt.decode_rows(stored, self.attrs, sparse_attention)

    def check_compatible(self, tokens, split: str = "train", vocab_size: int | None = None,
                         layers=()) -> None:
        """Refuse, before training, a store that does not belong to these tokens / this student."""
        task, tokens_task = fmt.attribute(self.attrs, "task"), getattr(tokens, "task_name", "causal")
        if task != tokens_task:
            raise KdcacheError(f"{self.path} holds {task} targets but the token store {tokens.path} holds "
                               f"{tokens_task} rows; capture targets from these tokens (`kdcache cache --tokens "
                               f"{tokens.path}`) or train on the tokens they came from.")
        if self.attrs["tokens_fingerprint"] != tokens.fingerprint:
            raise KdcacheError(f"{self.path} was captured from another token store (fingerprint "
                               f"{self.attrs['tokens_fingerprint']}, tokens have {tokens.fingerprint}); "
                               f"re-run `kdcache cache` on {tokens.name}, or, for a student of another "
                               f"tokenizer, pass the token store it was captured from as --teacher-tokens.")
        if self.attrs["split"] != split or self.rows != tokens.num_rows(split):
            raise KdcacheError(f"{self.path} covers split {self.attrs['split']!r} with {self.rows} rows; "
                               f"expected split {split!r} with {tokens.num_rows(split)} rows.")
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise KdcacheError(f"student vocabulary has {vocab_size} ids but the teacher's targets cover "
                               f"{self.vocab_size}; the student must use the teacher's tokenizer.")
        if task == "masked":  # the fingerprint covers the masks; this says so in words if they differ
            stored = self.group[fmt.TARGET_POSITIONS][...]
            if not np.array_equal(stored, tokens.column(split, "mask_positions")):
                raise KdcacheError(f"{self.path} was captured at other masked positions than the token store "
                                   f"{tokens.path} holds; re-run `kdcache cache` on these tokens.")
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise KdcacheError(f"teacher layers {missing} are mapped but were not captured (captured: "
                               f"{self.layers}); re-run cache with --layer for them or change layer_map.")

    def read_rows(self, start: int, stop: int, names=None) -> dict[str, np.ndarray]:
        """Stored (encoded) arrays for rows [start, stop)."""
        return {name: self.group[name][start:stop] for name in (names or self.array_names())}

    def read_positions(self, positions: np.ndarray, names) -> dict[str, torch.Tensor]:
        """Decoded arrays `names` (indexed [row, position, ...]) at flat positions row · P + position:
        positions (R, T) int64, −1 where there is none (filled from another position; mask those) →
        each array (R, T, ...). Reads the one range of rows the positions fall in."""
        P, found = fmt.positions(self.attrs), positions[positions >= 0]
        lo, hi = (int(found.min()) // P, int(found.max()) // P + 1) if found.size else (0, 1)
        decoded = self.decode(self.read_rows(lo, hi, names))
        index = torch.from_numpy(np.where(positions >= 0, positions - lo * P, 0)).flatten()
        return {name: t.flatten(0, 1)[index].reshape(*positions.shape, *t.shape[2:]) for name, t in decoded.items()}

    def bad_shards(self, names=None) -> list[int]:
        """Shards unfinished or whose checksums do not match what is on disk now (names: only these arrays)."""
        return bad_shards(self.group, self.shard_ranges, self.records, names)

    def bad_unsharded(self) -> list[str]:
        """Arrays not indexed by row (hidden bases) whose checksums do not match what is on disk now."""
        return bad_unsharded(self.group, self.attrs.get("unsharded", {}))

    def check_shards(self, names=None) -> None:
        """Raise a KdcacheError naming every bad shard (see bad_shards); names=None also checks the
        arrays not indexed by row."""
        arrays = self.bad_unsharded() if names is None else []
        if arrays:
            raise KdcacheError(f"{self.path} fails verification: {', '.join(arrays)} no longer match the "
                               f"checksums recorded at capture, and every shard was computed with them. "
                               f"Re-run `kdcache cache` with the same settings to rewrite the store.")
        bad = self.bad_shards(names)
        if bad:
            ranges = self.shard_ranges
            listed = ", ".join(f"{i} (rows {ranges[i][0]}-{ranges[i][1] - 1})" for i in bad)
            raise KdcacheError(f"{self.path} fails verification: bad shards {listed} are unfinished or no "
                               f"longer match the checksums recorded at capture. Re-run `kdcache cache` "
                               f"with the same settings to re-capture them, then `kdcache verify {self.path}`.")

    def verify(self) -> None:
        """check_shards, and refuse a store whose shards all match but that was never marked complete
        (killed between its last record and `complete`): readers refuse it, so verify does too."""
        self.check_shards()
        if not self.attrs.get("complete"):
            raise KdcacheError(f"{self.path}: every shard matches its checksums, but the capture was never "
                               f"marked complete (interrupted before its last step). Re-run `kdcache cache` "
                               f"with the same settings to finish it.")

