"""Encodings of cached values ⇄ tensors.

Top-k log-probs are stored in one of ENCODINGS; ids as uint16 up to 65 536 ids, else bit-packed at
ceil(log2 V) bits per id; hidden states as float16. Decoding always returns float32 / int64 tensors.
A top-p trimmed capture keeps a per-position count (`topk_count`); entries beyond it are stored as
zeros and decode to id 0 with log-prob −inf.

An encoding is one entry of ENCODINGS: the dtype of the stored `topk_logprobs` array, a one-line
description, and its codec: `encode` ((R, T, K) float32 log-probs, sorted descending along K → arrays
by name) and `decode` (those arrays → (R, T, K) float32). Encodings with per-position parameters
store them in a second array, `topk_logprobs_{name}` (its `params`). `encode_topk` / `decode_topk`
handle ids, values and top-p counts together; an encoding that `owns_ids` (sqd) overrides them and
stores the ids in its own order. docs/FORMAT.md ("Encodings") says how to decode each one with numpy
alone; keep the two in step.

Lossy encodings guarantee, after decoding: values non-increasing along K, and Σ exp ≤ 1 per position
(if rounding pushed the kept mass above 1, every value of that position is lowered by the excess,
log Σ exp; the stored `tail_logmass` is computed from the true values at capture and is untouched).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from pipeline.errors import KdcacheError
from pipeline.targets import format as fmt

HIDDEN_DTYPES = ("float16", "bfloat16")  # bfloat16: float32's range, 3 significant digits fewer
QUANT_RANGE = 30.0  # nats: quantised encodings clip log-probs more than this below a position's first


def cap_mass(logprobs: np.ndarray) -> np.ndarray:
    """Lower each position (last axis) by max(0, log Σ exp) so that its probabilities sum to ≤ 1."""
    x = np.asarray(logprobs, dtype=np.float32)
    if x.size == 0:
        return x
    top = x.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, np.float32(0))
    with np.errstate(divide="ignore"):  # log(0) = -inf for a position that is all -inf
        log_mass = top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))
    excess = np.maximum(log_mass, np.float32(0))  # 0 when the mass is ≤ 1 (or the position is all -inf)
    return x - excess if excess.any() else x


class Encoding(NamedTuple):
    """One encoding of top-k log-probs. Subclasses implement `encode` and `_decode`."""

    dtype: str          # dtype of the stored `topk_logprobs` array
    description: str    # one line, listed by `kdcache encodings`

    params = None       # name of the per-position parameter array, if the encoding has one
    lossy = True        # lossy encodings cap the decoded mass at 1 (see cap_mass)
    owns_ids = False    # true: `topk_ids` holds this encoding's own layout of the ids (see SqrtDeltaIds)

    def arrays(self, block_size: int, top_k: int) -> dict[str, tuple[tuple, str]]:
        """name -> (per-row shape, dtype) of every array the encoding stores."""
        return {fmt.TOPK_LOGPROBS: ((block_size, top_k), self.dtype)}

    def encode(self, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _decode(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def decode(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        """Stored arrays (by name) → float32 log-probs (..., K); entries beyond `topk_count` are −inf."""
        values = np.asarray(self._decode(stored), dtype=np.float32)
        if fmt.TOPK_COUNT in stored:
            values = np.where(padding(stored[fmt.TOPK_COUNT], values.shape[-1]), np.float32(-np.inf), values)
        return cap_mass(values) if self.lossy else values

    def encode_topk(self, ids: np.ndarray, logprobs: np.ndarray, ids_dtype: str,
                    count: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """(R, T, K) ids and float32 log-probs sorted descending, (R, T) kept entries or None (all K)
        → every stored top-k array by name. Entries beyond a position's count are stored as zeros."""
        if count is None:
            return {fmt.TOPK_IDS: encode_ids(ids, ids_dtype), **self.encode(logprobs)}
        pad = padding(count, logprobs.shape[-1])
        # Padding repeats the last kept value while encoding, so grids and differences span kept entries only.
        last = np.take_along_axis(logprobs, np.maximum(count - 1, 0)[..., None].astype(np.int64), axis=-1)
        stored = self.encode(np.where(pad, last, logprobs))
        stored[fmt.TOPK_LOGPROBS][pad] = 0
        return {fmt.TOPK_IDS: encode_ids(np.where(pad, 0, ids), ids_dtype), **stored,
                fmt.TOPK_COUNT: count.astype(count_dtype(logprobs.shape[-1]))}

    def decode_topk(self, stored: dict[str, np.ndarray], ids_dtype: str | None) -> dict[str, torch.Tensor]:
        """Stored top-k arrays → topk_logprobs (R, T, K) float32 and, if stored, topk_ids (R, T, K) int64."""
        logprobs = self.decode(stored)
        out = {fmt.TOPK_LOGPROBS: torch.from_numpy(np.ascontiguousarray(logprobs))}
        if fmt.TOPK_IDS in stored:
            out[fmt.TOPK_IDS] = decode_ids(stored[fmt.TOPK_IDS], ids_dtype, logprobs.shape[-1])
        return out


class Cast(Encoding):
    """Plain floating point: stored in `dtype`, decoded by a cast to float32."""

    def encode(self, logprobs):
        return {fmt.TOPK_LOGPROBS: np.asarray(logprobs, dtype=np.float32).astype(self.dtype)}

    def _decode(self, stored):
        return stored[fmt.TOPK_LOGPROBS].astype(np.float32)


class Float32(Cast):
    lossy = False


def bfloat16_bits(values) -> np.ndarray:
    """bfloat16 (the top 16 bits of a float32), rounded to nearest even, as uint16 bit patterns."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    rounded = np.where(np.isnan(values), np.uint32(0x7FC0), rounded)  # keep NaN a NaN
    return rounded.astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


class BFloat16(Encoding):
    """bfloat16 log-probs stored as uint16 bit patterns (numpy has no bfloat16)."""

    def encode(self, logprobs):
        return {fmt.TOPK_LOGPROBS: bfloat16_bits(logprobs)}

    def _decode(self, stored):
        return from_bfloat16_bits(stored[fmt.TOPK_LOGPROBS])


def _grid(logprobs: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-position float16 (offset, step): offset = first (largest) value, offset − levels·step ≤ the
    last value (or offset − QUANT_RANGE when the last is further down)."""
    x = np.asarray(logprobs, dtype=np.float32)
    offset = x[..., 0].astype(np.float16)
    low = np.maximum(x[..., -1], x[..., 0] - QUANT_RANGE)
    with np.errstate(invalid="ignore"):  # -inf − -inf for a position that is all -inf
        span = np.where(np.isfinite(offset), offset.astype(np.float32) - low, 0.0)
    step = (np.maximum(span, 0.0) / levels).astype(np.float16)
    short = step.astype(np.float32) * levels < span  # rounded down: one float16 ulp up covers the span
    step = np.where(short, np.nextafter(step, np.float16(np.inf)), step)
    return offset, step


def _codes(logprobs: np.ndarray, offset: np.ndarray, step: np.ndarray, levels: int) -> np.ndarray:
    """Nearest grid index of each value: round((offset − x) / step), clipped to [0, levels]."""
    x = np.asarray(logprobs, dtype=np.float32)
    o, s = offset.astype(np.float32)[..., None], step.astype(np.float32)[..., None]
    with np.errstate(invalid="ignore"):
        index = np.divide(o - x, s, out=np.zeros_like(x), where=s > 0)
    return np.clip(np.rint(np.nan_to_num(index, nan=0.0)), 0, levels).astype(np.uint8)


class LogQuant8(Encoding):
    """8-bit log-domain quantisation on a per-position linear grid.

    Stored: codes c (uint8, (R, T, K)) and params (float16, (R, T, 2)) = (offset, step); decoded
    value = offset − c·step. offset is the first (largest) log-prob, step = span / 255 with span
    from the first to the last log-prob (at most QUANT_RANGE), so the error is ≤ step / 2.
    Codes of sorted values are non-decreasing, so decoded values stay sorted.
    """

    params = f"{fmt.TOPK_LOGPROBS}_q8"
    levels = 255
    delta = False  # q8d stores c_k − c_{k−1} instead of c_k

    def arrays(self, block_size, top_k):
        return {**super().arrays(block_size, top_k), self.params: ((block_size, 2), "float16")}

    def encode(self, logprobs):
        offset, step = _grid(logprobs, self.levels)
        codes = _codes(logprobs, offset, step, self.levels)
        if self.delta:
            codes = np.diff(codes, axis=-1, prepend=np.uint8(0))  # wraps mod 256 if unsorted: still exact
        return {fmt.TOPK_LOGPROBS: codes, self.params: np.stack([offset, step], axis=-1)}

    def _decode(self, stored):
        codes, params = stored[fmt.TOPK_LOGPROBS], stored[self.params].astype(np.float32)
        if self.delta:
            codes = np.cumsum(codes, axis=-1, dtype=np.uint8)  # exact inverse of the diff, mod 256
        return params[..., :1] - codes.astype(np.float32) * params[..., 1:]


class LogQuant8Delta(LogQuant8):
    """q8's grid and values, with codes stored as differences of consecutive codes.

    Sorted log-probs give non-decreasing codes whose differences are small numbers: zstd stores them
    in fewer bytes than the codes themselves. Decoding yields exactly q8's values.
    """

    params = f"{fmt.TOPK_LOGPROBS}_q8d"
    delta = True


class SqrtDeltaIds(Encoding):
    """Ids and values together, in the order that compresses best; rank order is recovered at decoding.

    Per position, slot 0 holds the most probable entry; the other kept entries follow in increasing id
    order. `topk_ids` stores slot 0's id, then slot 1's id, then the differences of consecutive ids
    (small positive numbers: zstd's food); `topk_logprobs` stores uint8 codes c = round(L·√p) in the
    same order, L = `levels(K)`. The error in √p is ≤ 1/(2L) wherever p is, which costs about 1/(6L²)
    nats of KL per entry whatever its probability (KL ≈ Σ Δp² / 2p and Δp ≈ 2√p·Δ√p): K/(6L²) ≈ 1/192
    per position for every K. Code 0 (p < 1/(2L)²) decodes to 1/(2L)²/3, the mean of p there. Decoding
    sorts slots 1.. by value and keeps slot 0 first, strictly above them (they are capped one float32
    step below it): the top-1 id is exact.
    """

    owns_ids = True

    @staticmethod
    def levels(top_k: int) -> int:
        """L, the largest code: round(√(32·K)), at most 255 (32 levels at K = 32, 64 at K = 128)."""
        return min(255, round(math.sqrt(32 * top_k)))

    def encode(self, logprobs):
        raise KdcacheError("the sqd encoding stores ids and values together: encode them with encode_topk.")

    def encode_topk(self, ids, logprobs, ids_dtype, count=None):
        K = logprobs.shape[-1]
        pad = padding(np.full(logprobs.shape[:-1], K) if count is None else count, K)
        key = np.where(pad, np.iinfo(np.int64).max, ids.astype(np.int64))
        key[..., 0] = -1  # slot 0 stays first; padding sorts last
        order = np.argsort(key, axis=-1, kind="stable")
        ids, logprobs = np.take_along_axis(ids, order, -1), np.take_along_axis(logprobs, order, -1)
        deltas = np.diff(ids, axis=-1, prepend=0)
        deltas[..., :2] = ids[..., :2]
        L = self.levels(K)
        codes = np.clip(np.rint(np.sqrt(np.exp(logprobs.astype(np.float64))) * L), 0, L)
        stored = {fmt.TOPK_IDS: encode_ids(np.where(pad, 0, deltas), ids_dtype),
                  fmt.TOPK_LOGPROBS: np.where(pad, 0, codes).astype(np.uint8)}
        if count is not None:
            stored[fmt.TOPK_COUNT] = count.astype(count_dtype(K))
        return stored

    def _decode(self, stored):
        """Values in stored order (slot 0, then increasing id): one table look-up per code."""
        L = self.levels(stored[fmt.TOPK_LOGPROBS].shape[-1])
        codes = np.arange(L + 1, dtype=np.float32)
        table = np.log(np.where(codes == 0, np.float32(1 / (2 * L) ** 2 / 3), (codes / np.float32(L)) ** 2))
        return table[np.minimum(stored[fmt.TOPK_LOGPROBS], L)]

    def decode_topk(self, stored, ids_dtype):
        if fmt.TOPK_IDS not in stored:
            raise KdcacheError("the sqd encoding stores ids and values together: read topk_ids with topk_logprobs.")
        codes = stored[fmt.TOPK_LOGPROBS]
        values = torch.from_numpy(self.decode(stored))  # (R, T, K): padding −inf, mass capped
        K = values.shape[-1]
        ids = decode_ids(stored[fmt.TOPK_IDS], ids_dtype, K)
        ids[..., 1:] = ids[..., 1:].cumsum(dim=-1)
        ids.masked_fill_(torch.isneginf(values), 0)
        # Slots 1.. by value, descending, ties (and padding, which has code 0 and comes last) in slot
        # order. Values grow with codes, so sorting the distinct integer keys (L − code)·K + slot gives
        # that order, about twice as fast as a stable float sort.
        keys = (self.levels(K) - torch.from_numpy(codes[..., 1:].astype(np.int32))) * K + torch.arange(K - 1, dtype=torch.int32)
        order = keys.sort(dim=-1).indices
        ids[..., 1:] = ids[..., 1:].gather(-1, order)
        values[..., 1:] = torch.minimum(values[..., 1:].gather(-1, order),
                                        torch.nextafter(values[..., :1], torch.tensor(-np.inf)))
        return {fmt.TOPK_IDS: ids, fmt.TOPK_LOGPROBS: values}


ENCODINGS: dict[str, Encoding] = {
    "fp32": Float32("float32", "float32 log-probs: the reference, 4 bytes per kept entry."),
    "fp16": Cast("float16", "float16 log-probs: 2 bytes per kept entry, ~3 significant digits."),
    "bf16": BFloat16("uint16", "bfloat16 log-probs as uint16 bits: 2 bytes per entry, ~2 significant digits."),
    "q8": LogQuant8("uint8", "8-bit codes on a per-position log-prob grid (offset, step): error <= step/2."),
    "q8d": LogQuant8Delta("uint8", "q8's values with codes stored as consecutive differences: "
                                   "fewer bytes after compression."),
    "sqd": SqrtDeltaIds("uint8", "ids and values together: ids in increasing order as differences, "
                                 "values as codes of sqrt(p) (0..32 at k = 32); the top-1 id stays exact."),
}


# --- Ids: uint16 up to 65 536 ids, else bit-packed ------------------------------------------------------

MAX_ID_BITS = 25  # unpacking reads each id from one little-endian uint32 word at a bit offset of ≤ 7


def ids_dtype(vocab_size: int) -> str:
    """How ids are stored (the `ids_dtype` attribute): 'uint16' for V ≤ 65 536, else 'packed{b}' with
    b = ceil(log2 V) bits per id, e.g. 'packed18' for 152 064 ids."""
    if vocab_size <= 2**16:
        return "uint16"
    bits = (vocab_size - 1).bit_length()
    if bits > MAX_ID_BITS:
        raise KdcacheError(f"a vocabulary of {vocab_size} ids needs {bits} bits per id; the targets store "
                           f"packs at most {MAX_ID_BITS} (2**{MAX_ID_BITS} ids).")
    return f"packed{bits}"


def id_bits(ids_dtype: str) -> int | None:
    """Bits per id of a 'packed{b}' layout; None for a plain integer dtype (uint16, or uint32 of old stores)."""
    return int(ids_dtype[len("packed"):]) if ids_dtype.startswith("packed") else None


def ids_spec(ids_dtype: str, width: int) -> tuple[tuple, str]:
    """(per-position shape, dtype) of a stored array of `width` ids per position."""
    bits = id_bits(ids_dtype)
    return ((width,), ids_dtype) if bits is None else ((-(-width * bits // 8),), "uint8")


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """(..., W) ids < 2**bits → (..., ceil(W·bits / 8)) uint8. Id w fills bits [w·bits, (w+1)·bits) of
    the position's little-endian bit string (bit i of the string = bit i % 8 of byte i // 8)."""
    ids = np.asarray(ids, dtype=np.uint32)
    planes = ((ids[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)  # (..., W, bits)
    return np.packbits(planes.reshape(*ids.shape[:-1], -1), axis=-1, bitorder="little")


def unpack_ids(packed: np.ndarray, bits: int, width: int) -> np.ndarray:
    """Inverse of pack_ids: (..., bytes) uint8 → (..., width) int64. Each id is cut out of the uint32
    word starting at its first byte; bytes past the end (clipped reads) only feed bits that are masked."""
    start = np.arange(width) * bits
    first, shift = start // 8, (start % 8).astype(np.uint32)
    word = np.zeros((*packed.shape[:-1], width), dtype=np.uint32)
    for j in range(4):
        word |= np.take(packed, first + j, axis=-1, mode="clip").astype(np.uint32) << np.uint32(8 * j)
    return ((word >> shift) & np.uint32((1 << bits) - 1)).astype(np.int64)


def encode_ids(ids, ids_dtype: str) -> np.ndarray:
    """(..., W) ids (tensor or array) → the stored array in layout `ids_dtype`."""
    ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    bits = id_bits(ids_dtype)
    return ids.astype(ids_dtype) if bits is None else pack_ids(ids, bits)


def decode_ids(stored: np.ndarray, ids_dtype: str | None, width: int) -> torch.Tensor:
    """A stored ids array → (..., width) int64. ids_dtype None: the array's own integer dtype (not packed)."""
    if ids_dtype is None and stored.dtype == np.uint8:
        raise KdcacheError("these ids are bit-packed: decode them with the store's attributes, "
                           "decode_rows(stored, store.attrs).")
    bits = id_bits(ids_dtype or stored.dtype.name)
    return torch.from_numpy(stored.astype(np.int64) if bits is None else unpack_ids(stored, bits, width))


# --- Top-p trimming: a per-position count of kept entries ------------------------------------------------

def count_dtype(top_k: int) -> str:
    return "uint8" if top_k <= 255 else "uint16"


def padding(count: np.ndarray, top_k: int) -> np.ndarray:
    """(R, T) kept counts → (R, T, K) bool, true at the padded entries (index ≥ count)."""
    return np.arange(top_k) >= np.asarray(count)[..., None]


def check_encoding(name: str) -> None:
    if name not in ENCODINGS:
        raise KdcacheError(f"unknown encoding {name!r}; choose one of {', '.join(ENCODINGS)} "
                           f"(`kdcache encodings` lists them).")


def topk_arrays(encoding: str, block_size: int, top_k: int) -> dict[str, tuple[tuple, str]]:
    """The arrays that hold top-k log-probs in `encoding`: name -> (per-row shape, dtype)."""
    check_encoding(encoding)
    return ENCODINGS[encoding].arrays(block_size, top_k)


def topk_store_arrays(encoding: str, block_size: int, top_k: int, ids_dtype: str,
                      trimmed: bool) -> dict[str, tuple[tuple, str]]:
    """Every array of the top-k targets but the tail: ids, values (+ parameters), counts if `trimmed`."""
    id_shape, id_dtype = ids_spec(ids_dtype, top_k)
    specs = {fmt.TOPK_IDS: ((block_size, *id_shape), id_dtype), **topk_arrays(encoding, block_size, top_k)}
    if trimmed:
        specs[fmt.TOPK_COUNT] = ((block_size,), count_dtype(top_k))
    return specs


def topk_names(encoding: str) -> list[str]:
    """Names of the arrays that hold top-k log-probs in `encoding` (read them together)."""
    check_encoding(encoding)
    params = ENCODINGS[encoding].params
    return [fmt.TOPK_LOGPROBS] + ([params] if params else [])


def encode_topk_logprobs(logprobs: torch.Tensor, encoding: str) -> dict[str, np.ndarray]:
    """(R, T, K) log-probs sorted descending along K → the encoding's arrays by name (not for encodings
    that own the ids: use encode_topk)."""
    check_encoding(encoding)
    return ENCODINGS[encoding].encode(logprobs.float().cpu().numpy())


def find_encoding(stored: dict[str, np.ndarray], name: str | None = None) -> Encoding:
    """The encoding of stored top-k arrays: `name` (the store's `encoding` attribute) if given, else by
    their parameter array, else by the values' dtype."""
    if name is not None:
        check_encoding(name)
        return ENCODINGS[name]
    for encoding in ENCODINGS.values():
        if encoding.params and encoding.params in stored:
            return encoding
    dtype = np.dtype(stored[fmt.TOPK_LOGPROBS].dtype).name
    for encoding in ENCODINGS.values():
        if not encoding.params and not encoding.owns_ids and encoding.dtype == dtype:
            return encoding
    needs = [e.params for e in ENCODINGS.values() if e.params and e.dtype == dtype]
    raise KdcacheError(f"{fmt.TOPK_LOGPROBS} is stored as {dtype} and cannot be decoded without its "
                       f"parameter array ({' or '.join(needs) or 'none known'}); read every array of "
                       f"TargetsStore.array_names() that starts with {fmt.TOPK_LOGPROBS}, and pass the "
                       f"store's attributes (decode_rows(stored, store.attrs)) to name its encoding.")


def decode_topk_logprobs(stored: dict[str, np.ndarray]) -> torch.Tensor:
    """Stored top-k arrays (`topk_logprobs` and its parameter array, if any) → float32 (R, T, K)."""
    return torch.from_numpy(np.ascontiguousarray(find_encoding(stored).decode(stored), dtype=np.float32))


def encode_topk(ids: torch.Tensor, logprobs: torch.Tensor, encoding: str, ids_dtype: str,
                count: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """(R, T, K) ids and log-probs sorted descending (and (R, T) kept counts, if trimmed) → stored arrays."""
    check_encoding(encoding)
    count = None if count is None else count.cpu().numpy()
    return ENCODINGS[encoding].encode_topk(ids.cpu().numpy(), logprobs.float().cpu().numpy(), ids_dtype, count)


def decode_topk(stored: dict[str, np.ndarray], ids_dtype: str | None = None,
                encoding: str | None = None) -> dict[str, torch.Tensor]:
    """Stored top-k arrays (ids, values and their parameters, counts) → topk_ids int64 (if stored) and
    topk_logprobs float32, (R, T, K) each, most probable first; padded entries are id 0, log-prob −inf.
    ids_dtype, encoding: the store's attributes of those names (needed for packed ids and for sqd)."""
    return find_encoding(stored, encoding).decode_topk(stored, ids_dtype)


def hidden_storage_dtype(hidden_dtype: str) -> str:
    """The array dtype of `hidden_layer_*`: bfloat16 is kept as its uint16 bit patterns."""
    return "uint16" if hidden_dtype == "bfloat16" else hidden_dtype


def encode_hidden(hidden: torch.Tensor, hidden_dtype: str = "float16") -> np.ndarray:
    values = hidden.float().cpu().numpy()
    return bfloat16_bits(values) if hidden_dtype == "bfloat16" else values.astype(hidden_dtype)


def decode_hidden(stored: np.ndarray, hidden_dtype: str = "float16") -> torch.Tensor:
    values = from_bfloat16_bits(stored) if hidden_dtype == "bfloat16" else np.asarray(stored, dtype=np.float32)
    return torch.from_numpy(values)
