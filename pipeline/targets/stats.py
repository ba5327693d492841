"""What a targets store holds and what it costs: bytes per token per array, tail-mass distribution."""

from __future__ import annotations

import numpy as np

from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore

TAIL_PERCENTILES = (1, 10, 50, 90, 99)


def stored_bytes(store: TargetsStore, name: str) -> int:
    return sum(f.stat().st_size for f in (store.path / name).rglob("*") if f.is_file())


def summarize(store: TargetsStore, tail_sample_rows: int = 256) -> dict:
    """A JSON-able description: sizes, settings, fingerprints, completion, tail-mass percentiles."""
    attrs = store.attrs
    tokens = store.rows * int(attrs["block_size"])
    arrays, raw_total, stored_total = {}, 0, 0
    for name in store.array_names():
        array = store.group[name]
        raw = int(np.prod(array.shape)) * array.dtype.itemsize
        stored = stored_bytes(store, name)
        arrays[name] = {"dtype": str(array.dtype), "shape": list(array.shape),
                        "bytes_per_token": stored / tokens, "compression_ratio": raw / max(stored, 1)}
        raw_total, stored_total = raw_total + raw, stored_total + stored
    if store.top_k:
        tail = store.group[fmt.TAIL_LOGMASS][: min(store.rows, tail_sample_rows)]
        tail_mass = np.exp(tail.astype(np.float64)).ravel()
        # Kept entries per position: all K, unless top-p trimmed them (then `topk_count` holds them).
        kept = (store.group[fmt.TOPK_COUNT][: min(store.rows, tail_sample_rows)].astype(np.float64).ravel()
                if store.top_p < 1.0 else np.full(1, float(store.top_k)))
    else:  # sampled targets only: no tail
        tail_mass, kept = np.zeros(1), np.zeros(1)
    return {
        "path": str(store.path), "complete": bool(attrs.get("complete")),
        "format_version": attrs["format_version"], "rows": store.rows, "tokens": tokens,
        "bytes_per_token": stored_total / tokens, "compression_ratio": raw_total / max(stored_total, 1),
        "fp16_full_logits_bytes_per_token": 2 * store.vocab_size,
        "arrays": {name: a["bytes_per_token"] for name, a in arrays.items()}, "array_details": arrays,
        "encoding": attrs["encoding"], "top_k": attrs["top_k"], "samples": attrs["samples"], "temperature": attrs["temperature"],
        "layers": attrs["layers"], "vocab_size": store.vocab_size, "split": attrs["split"],
        "shards_done": len(attrs.get("shards", {})), "shards": len(store.shard_ranges),
        "tokens_fingerprint": attrs["tokens_fingerprint"], "teacher_fingerprint": attrs["teacher_fingerprint"],
        "tail_mass_percentiles": {str(p): float(np.percentile(tail_mass, p)) for p in TAIL_PERCENTILES},
        "tail_mass_mean": float(tail_mass.mean()),
        "top_p": store.top_p, "min_k": int(attrs.get("min_k", 1)), "kept_mean": float(kept.mean()),
        "kept_percentiles": {str(p): float(np.percentile(kept, p)) for p in TAIL_PERCENTILES},
    }
