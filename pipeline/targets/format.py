"""Layout of the targets store: array names, attributes, format version, codecs, checks.

docs/FORMAT.md is the human-readable version of this file; keep the two in step.
"""

from __future__ import annotations

from zarr.codecs import BloscCodec

from pipeline.errors import KdcacheError

FORMAT_NAME = "kdcache-targets"
FORMAT_VERSION = 1

TOPK_IDS = "topk_ids"            # (R, T, K) uint16 | uint32, sorted by teacher probability, descending
TOPK_LOGPROBS = "topk_logprobs"  # (R, T, K) float32 | float16, log p at the capture temperature
TAIL_LOGMASS = "tail_logmass"    # (R, T) float32, log(1 - sum of the top-k probabilities); -inf if none
SAMPLED_IDS = "sampled_ids"      # (R, T, N) ids drawn from the teacher, distinct ids first, then id 0 padding
SAMPLED_COUNTS = "sampled_counts"  # (R, T, N) uint8 draw counts of those ids (0 for padding); sum N


def hidden_array(layer: int) -> str:
    """Hidden states of one teacher layer: (R, T, D) float16; 0 = embeddings, i = after block i."""
    return f"hidden_layer_{layer}"


def hidden_basis_arrays(layer: int) -> tuple[str, str]:
    """With hidden_rank P > 0: the layer's basis (D, P) float32 and mean (D,) float32, written once."""
    return f"hidden_basis_layer_{layer}", f"hidden_mean_layer_{layer}"


def teacher_key(name: str, teacher: int) -> str:
    """Batch key of array `name` from the teacher-th targets store (the first keeps the bare name)."""
    return name if teacher == 0 else f"{name}@{teacher}"


# Attributes that identify what a store holds. A store whose identity differs from the capture being
# asked for is stale (different teacher, tokens or settings) and is rewritten, never resumed.
IDENTITY_KEYS = ("format", "format_version", "tokens_fingerprint", "teacher_fingerprint", "split",
                 "rows", "block_size", "vocab_size", "temperature", "top_k", "encoding", "ids_dtype",
                 "layers", "hidden_size", "hidden_dtype", "rows_per_chunk", "rows_per_shard",
                 "teacher_num_layers", "samples", "seed")
# Low-rank hidden states (0 = full width); fit rows are 0 when hidden_rank is 0. Stores written before
# these keys existed hold full-width hidden states: the defaults stand in for the missing attributes.
IDENTITY_KEYS += ("hidden_rank", "hidden_fit_rows")
IDENTITY_DEFAULTS = {"hidden_rank": 0, "hidden_fit_rows": 0}


def compressor_for(dtype) -> BloscCodec:
    """Bit-shuffle floats (sign/exponent bits line up across values); byte-shuffle integer ids."""
    shuffle = "bitshuffle" if str(dtype).startswith(("float", "bfloat")) else "shuffle"
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)


def shard_ranges(rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of every shard; the last one may be short."""
    return [(start, min(start + rows_per_shard, rows)) for start in range(0, rows, rows_per_shard)]


def check_version(attrs: dict, path) -> None:
    if attrs.get("format") != FORMAT_NAME:
        raise KdcacheError(f"{path} is not a kdcache targets store (format={attrs.get('format')!r}).")
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise KdcacheError(f"{path} was written with targets format version {version}; this kdcache reads "
                           f"version {FORMAT_VERSION}. Re-run `kdcache cache` to rewrite it, or use the "
                           f"kdcache release that wrote it.")
