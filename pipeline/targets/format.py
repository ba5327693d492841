"""Layout of the targets store: array names, attributes, format version, codecs, checks.

docs/FORMAT.md is the human-readable version of this file; keep the two in step.
"""

from __future__ import annotations

from zarr.codecs import BloscCodec

from pipeline.errors import KdcacheError

FORMAT_NAME = "kdcache-targets"
FORMAT_VERSION = 2  # 2 added bit-packed ids, the sqd encoding, top-p trimming, low-rank hidden states
READABLE_VERSIONS = (1, 2)  # a version-1 store is a version-2 store with those features off

TOPK_IDS = "topk_ids"            # (R, T, K) uint16, or bit-packed uint8 bytes above 65 536 ids (see encode.py)
TOPK_LOGPROBS = "topk_logprobs"  # (R, T, K) log p at the capture temperature, in the store's encoding
TAIL_LOGMASS = "tail_logmass"    # (R, T) float32, log(1 - sum of the top-k probabilities); -inf if none
TOPK_COUNT = "topk_count"        # (R, T) uint8 | uint16, kept entries per position (top-p); absent: all K
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
                 "rows", "block_size", "vocab_size", "temperature", "top_k", "top_p", "min_k", "encoding",
                 "ids_dtype", "layers", "hidden_size", "hidden_dtype", "hidden_rank", "hidden_fit_rows",
                 "rows_per_chunk", "rows_per_shard", "teacher_num_layers", "samples", "seed")

# Identity keys added in format version 2, with the value that means "off": a version-1 store (or an
# identity) without them holds that value, so version-1 stores stay readable.
IDENTITY_DEFAULTS = {"top_p": 1.0, "min_k": 1, "hidden_rank": 0, "hidden_fit_rows": 0}


def identity_of(attrs: dict) -> dict:
    """The IDENTITY_KEYS of a store's attributes (or of a capture's settings), defaults filled in."""
    return {key: attrs.get(key, IDENTITY_DEFAULTS.get(key)) for key in IDENTITY_KEYS}


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
    if version not in READABLE_VERSIONS:
        raise KdcacheError(f"{path} was written with targets format version {version}; this kdcache reads "
                           f"versions {', '.join(map(str, READABLE_VERSIONS))}. Re-run `kdcache cache` to "
                           f"rewrite it, or use the kdcache release that wrote it.")
