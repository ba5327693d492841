"""Read a targets store: open with checks, then read whole shards (the unit of streaming)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.errors import KdcacheError
from pipeline.targets import encode
from pipeline.targets import format as fmt
from pipeline.targets.writer import bad_shards, bad_unsharded


class TargetsStore:
    def __init__(self, path: str | Path, require_complete: bool = True):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise KdcacheError(f"{self.path} is not a targets store (no zarr.json); "
                               f"run `kdcache cache --out {self.path}` first.")
        self.group = zarr.open_group(self.path, mode="r")
        self.attrs = dict(self.group.attrs)
        fmt.check_version(self.attrs, self.path)
        if require_complete and not self.attrs.get("complete"):
            done, total = len(self.attrs.get("shards", {})), len(self.shard_ranges)
            raise KdcacheError(f"{self.path} is an unfinished capture ({done}/{total} shards); re-run "
                               f"`kdcache cache` with the same settings to resume it.")

    rows = property(lambda self: int(self.attrs["rows"]))
    top_k = property(lambda self: int(self.attrs["top_k"]))
    layers = property(lambda self: list(self.attrs["layers"]))
    vocab_size = property(lambda self: int(self.attrs["vocab_size"]))
    temperature = property(lambda self: float(self.attrs["temperature"]))

    @property
    def shard_ranges(self) -> list[tuple[int, int]]:
        return fmt.shard_ranges(int(self.attrs["rows"]), int(self.attrs["rows_per_shard"]))

    samples = property(lambda self: int(self.attrs["samples"]))
    top_p = property(lambda self: float(self.attrs.get("top_p", 1.0)))

    hidden_rank = property(lambda self: int(self.attrs.get("hidden_rank", 0)))  # absent: full width

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
        if not self.top_k:
            return []
        trimmed = [fmt.TOPK_COUNT] if self.top_p < 1.0 else []
        return [fmt.TOPK_IDS, *encode.topk_names(self.attrs["encoding"]), *trimmed, fmt.TAIL_LOGMASS]

    def sampled_names(self) -> list[str]:
        return [fmt.SAMPLED_IDS, fmt.SAMPLED_COUNTS] if self.samples else []

    def array_names(self) -> list[str]:
        return self.topk_names() + self.sampled_names() + [fmt.hidden_array(l) for l in self.layers]

    def check_compatible(self, tokens, split: str = "train", vocab_size: int | None = None,
                         layers=()) -> None:
        """Refuse, before training, a store that does not belong to these tokens / this student."""
        if self.attrs["tokens_fingerprint"] != tokens.fingerprint:
            raise KdcacheError(f"{self.path} was captured from another token store (fingerprint "
                               f"{self.attrs['tokens_fingerprint']}, tokens have {tokens.fingerprint}); "
                               f"re-run `kdcache cache` on {tokens.path}.")
        if self.attrs["split"] != split or self.rows != tokens.num_rows(split):
            raise KdcacheError(f"{self.path} covers split {self.attrs['split']!r} with {self.rows} rows; "
                               f"expected split {split!r} with {tokens.num_rows(split)} rows.")
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise KdcacheError(f"student vocabulary has {vocab_size} ids but the teacher's targets cover "
                               f"{self.vocab_size}; the student must use the teacher's tokenizer.")
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise KdcacheError(f"teacher layers {missing} are mapped but were not captured (captured: "
                               f"{self.layers}); re-run cache with --layer for them or change layer_map.")

    def read_rows(self, start: int, stop: int, names=None) -> dict[str, np.ndarray]:
        """Stored (encoded) arrays for rows [start, stop)."""
        return {name: self.group[name][start:stop] for name in (names or self.array_names())}

    def bad_shards(self, names=None) -> list[int]:
        """Shards unfinished or whose checksums do not match what is on disk now (names: only these arrays)."""
        return bad_shards(self.group, self.shard_ranges, self.attrs.get("shards", {}), names)

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


def decode_rows(stored: dict[str, np.ndarray], attrs: dict | None = None) -> dict[str, torch.Tensor]:
    """Encoded arrays → float32 / int64 tensors, same names.

    attrs: the store's attributes (`TargetsStore.attrs`); needed for bit-packed ids (V > 65 536) and
    for encodings that store ids and values together (sqd).
    Top-k arrays are decoded together: an encoding's parameter array (`topk_logprobs_{name}`) and
    `topk_count` must be passed along with `topk_logprobs` and are consumed, not returned.
    """
    ids_dtype = (attrs or {}).get("ids_dtype")
    encoding = encode.ENCODINGS.get((attrs or {}).get("encoding"))
    params = {e.params for e in encode.ENCODINGS.values() if e.params} | {fmt.TOPK_COUNT}
    out = {}
    if fmt.TOPK_LOGPROBS in stored:
        out.update(encode.decode_topk({n: a for n, a in stored.items() if n == fmt.TOPK_IDS or
                                       n == fmt.TOPK_LOGPROBS or n in params}, ids_dtype,
                                      (attrs or {}).get("encoding")))
    for name, array in stored.items():
        if name in out or name in params:
            continue
        if name == fmt.TOPK_IDS and encoding is not None and encoding.owns_ids:  # ids alone are differences
            raise KdcacheError(f"encoding {attrs['encoding']} stores ids and values together: read "
                               f"{fmt.TOPK_IDS} with {fmt.TOPK_LOGPROBS}.")
        if name in (fmt.TOPK_IDS, fmt.SAMPLED_IDS):
            width = (attrs or {}).get("top_k" if name == fmt.TOPK_IDS else "samples", array.shape[-1])
            out[name] = encode.decode_ids(array, ids_dtype, int(width))
        elif name == fmt.SAMPLED_COUNTS:
            out[name] = torch.from_numpy(array.astype(np.int64))
        elif name.startswith("hidden_layer_"):
            out[name] = encode.decode_hidden(array, (attrs or {}).get("hidden_dtype", "float16"))
        else:
            out[name] = torch.from_numpy(np.asarray(array, dtype=np.float32))
    return out
