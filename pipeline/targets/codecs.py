"""Value codecs: cached top-k log-probs and hidden states ⇄ stored arrays.

A codec knows nothing of store array names: it takes and gives arrays by *role* — IDS, VALUES,
PARAMS (per-position parameters, if the encoding has them), COUNT (kept entries per position, top-p)
— and `targets/format.py` maps roles to array names. Decoding always returns float32 / int64.

An encoding is one entry of ENCODINGS: the dtype of its VALUES array, a one-line description, and
its codec: `encode` ((R, T, K) float32 log-probs, sorted descending along K → arrays by role) and
`_decode` (those arrays → (R, T, K) float32). `encode_topk` / `decode_topk` handle ids, values and
top-p counts together; an encoding that `owns_ids` (sqd) overrides them and stores the ids in its
own order. docs/FORMAT.md ("Encodings") says how to decode each one with numpy alone.
A top-p trimmed capture keeps a per-position count; entries beyond it are stored as zeros and decode
to id 0 with log-prob −inf.

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
from pipeline.targets.ids import count_dtype, decode_ids, encode_ids, padding

# Roles of the arrays a top-k codec reads and writes (format.py names them in the store).
IDS, VALUES, PARAMS, COUNT = "ids", "values", "params", "count"

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

    has_params = False  # true: a PARAMS array holds per-position parameters (q8, q8d)
    lossy = True        # lossy encodings cap the decoded mass at 1 (see cap_mass)
    owns_ids = False    # true: `topk_ids` holds this encoding's own layout of the ids (see SqrtDeltaIds)

    def arrays(self, positions: int, top_k: int) -> dict[str, tuple[tuple, str]]:
        """role -> (per-row shape, dtype) of every value array the encoding stores."""
        return {VALUES: ((positions, top_k), self.dtype)}

    def encode(self, logprobs: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _decode(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def decode(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        """Stored arrays (by role) → float32 log-probs (..., K); entries beyond `topk_count` are −inf."""
        values = np.asarray(self._decode(stored), dtype=np.float32)
        if COUNT in stored:
            values = np.where(padding(stored[COUNT], values.shape[-1]), np.float32(-np.inf), values)
        return cap_mass(values) if self.lossy else values

    def encode_topk(self, ids: np.ndarray, logprobs: np.ndarray, ids_dtype: str,
                    count: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """(R, T, K) ids and float32 log-probs sorted descending, (R, T) kept entries or None (all K)
        → every stored top-k array by role. Entries beyond a position's count are stored as zeros."""
        if count is None:
            return {IDS: encode_ids(ids, ids_dtype), **self.encode(logprobs)}
        pad = padding(count, logprobs.shape[-1])
        # Padding repeats the last kept value while encoding, so grids and differences span kept entries only.
        last = np.take_along_axis(logprobs, np.maximum(count - 1, 0)[..., None].astype(np.int64), axis=-1)
        stored = self.encode(np.where(pad, last, logprobs))
        stored[VALUES][pad] = 0
        return {IDS: encode_ids(np.where(pad, 0, ids), ids_dtype), **stored,
                COUNT: count.astype(count_dtype(logprobs.shape[-1]))}

    def decode_topk(self, stored: dict[str, np.ndarray], ids_dtype: str | None) -> dict[str, torch.Tensor]:
        """Stored top-k arrays (by role) → VALUES (R, T, K) float32 and, if stored, IDS (R, T, K) int64."""
        logprobs = self.decode(stored)
        out = {VALUES: torch.from_numpy(np.ascontiguousarray(logprobs))}
        if IDS in stored:
            out[IDS] = decode_ids(stored[IDS], ids_dtype, logprobs.shape[-1])
        return out


class Cast(Encoding):
    """Plain floating point: stored in `dtype`, decoded by a cast to float32."""

    def encode(self, logprobs):
        return {VALUES: np.asarray(logprobs, dtype=np.float32).astype(self.dtype)}

    def _decode(self, stored):
        return stored[VALUES].astype(np.float32)


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
        return {VALUES: bfloat16_bits(logprobs)}

    def _decode(self, stored):
        return from_bfloat16_bits(stored[VALUES])


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

    has_params = True
    levels = 255
    delta = False  # q8d stores c_k − c_{k−1} instead of c_k

    def arrays(self, positions, top_k):
        return {**super().arrays(positions, top_k), PARAMS: ((positions, 2), "float16")}

    def encode(self, logprobs):
        offset, step = _grid(logprobs, self.levels)
        codes = _codes(logprobs, offset, step, self.levels)
        if self.delta:
            codes = np.diff(codes, axis=-1, prepend=np.uint8(0))  # wraps mod 256 if unsorted: still exact
        return {VALUES: codes, PARAMS: np.stack([offset, step], axis=-1)}

    def _decode(self, stored):
        codes, params = stored[VALUES], stored[PARAMS].astype(np.float32)
        if self.delta:
            codes = np.cumsum(codes, axis=-1, dtype=np.uint8)  # exact inverse of the diff, mod 256
        return params[..., :1] - codes.astype(np.float32) * params[..., 1:]


class LogQuant8Delta(LogQuant8):
    """q8's grid and values, with codes stored as differences of consecutive codes.

    Sorted log-probs give non-decreasing codes whose differences are small numbers: zstd stores them
    in fewer bytes than the codes themselves. Decoding yields exactly q8's values.
    """

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
        stored = {IDS: encode_ids(np.where(pad, 0, deltas), ids_dtype),
                  VALUES: np.where(pad, 0, codes).astype(np.uint8)}
        if count is not None:
            stored[COUNT] = count.astype(count_dtype(K))
        return stored

    def _decode(self, stored):
        """Values in stored order (slot 0, then increasing id): one table look-up per code."""
        L = self.levels(stored[VALUES].shape[-1])
        codes = np.arange(L + 1, dtype=np.float32)
        table = np.log(np.where(codes == 0, np.float32(1 / (2 * L) ** 2 / 3), (codes / np.float32(L)) ** 2))
        return table[np.minimum(stored[VALUES], L)]

    def decode_topk(self, stored, ids_dtype):
        if IDS not in stored:
            raise KdcacheError("the sqd encoding stores ids and values together: read topk_ids with topk_logprobs.")
        codes = stored[VALUES]
        values = torch.from_numpy(self.decode(stored))  # (R, T, K): padding −inf, mass capped
        K = values.shape[-1]
        ids = decode_ids(stored[IDS], ids_dtype, K)
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
        return {IDS: ids, VALUES: values}


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


def check_encoding(name: str) -> None:
    if name not in ENCODINGS:
        raise KdcacheError(f"unknown encoding {name!r}; choose one of {', '.join(ENCODINGS)} "
                           f"(`kdcache encodings` lists them).")


def hidden_storage_dtype(hidden_dtype: str) -> str:
    """The array dtype of `hidden_layer_*`: bfloat16 is kept as its uint16 bit patterns."""
    return "uint16" if hidden_dtype == "bfloat16" else hidden_dtype


def encode_hidden(hidden: torch.Tensor, hidden_dtype: str = "float16") -> np.ndarray:
    values = hidden.float().cpu().numpy()
    return bfloat16_bits(values) if hidden_dtype == "bfloat16" else values.astype(hidden_dtype)


def decode_hidden(stored: np.ndarray, hidden_dtype: str = "float16") -> torch.Tensor:
    values = from_bfloat16_bits(stored) if hidden_dtype == "bfloat16" else np.asarray(stored, dtype=np.float32)
    return torch.from_numpy(values)


# --- Attention rows: (R, H, T, T) row-stochastic, causal matrices ⇄ stored arrays -------------------
# Roles: KEYS (which keys a row keeps, topk only) and PROBS. Every encoding decodes the same way: the
# stored probabilities are placed, the mass they miss (1 − Σ stored) is spread evenly over the row's
# causal keys that got nothing, and the row is renormalised, so a decoded row is a distribution over
# keys 0..q (never 0 where the teacher had mass, so its KL is finite).

KEYS, PROBS = "keys", "probs"
ATTENTION_ENCODINGS = {
    "topk": "per query row the K most attended keys (uint16) and their probabilities (float16)",
    "q8": "every causal entry as 8 bits of sqrt(probability) (uint8, the upper triangle all zero)",
    "fp16": "every entry as float16 (the reference; T values per row)",
}


def check_attention_encoding(name: str) -> None:
    if name not in ATTENTION_ENCODINGS:
        raise KdcacheError(f"unknown attention encoding {name!r}; choose one of {', '.join(ATTENTION_ENCODINGS)}.")


def attention_arrays(encoding: str, heads: int, block: int, top_k: int) -> dict[str, tuple[tuple, str]]:
    """role -> (per-row shape, dtype) of one attention matrix in `encoding` (H heads, T = block)."""
    check_attention_encoding(encoding)
    if encoding == "topk":
        return {KEYS: ((heads, block, top_k), "uint16"), PROBS: ((heads, block, top_k), "float16")}
    return {PROBS: ((heads, block, block), "uint8" if encoding == "q8" else "float16")}


def attention_bytes_per_token(encoding: str, heads: int, block: int, top_k: int) -> float:
    """Raw (uncompressed) bytes per token of one attention matrix in `encoding`."""
    specs = attention_arrays(encoding, heads, block, top_k).values()
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs) / block


def encode_attention(probs: torch.Tensor, encoding: str, top_k: int = 0) -> dict[str, np.ndarray]:
    """(R, H, T, T) attention probabilities (rows sum to 1, zero above the diagonal) → arrays by role."""
    check_attention_encoding(encoding)
    probs = probs.float()
    if encoding == "topk":
        kept, keys = probs.topk(min(top_k, probs.shape[-1]), dim=-1, sorted=True)  # (R, H, T, K)
        # Rows with fewer than K causal keys pick zero-probability keys above the diagonal: harmless,
        # a zero places nothing.
        return {KEYS: keys.cpu().numpy().astype(np.uint16), PROBS: kept.cpu().numpy().astype(np.float16)}
    if encoding == "q8":
        # sqrt spreads the 255 levels towards small probabilities (the ones KL is sensitive to).
        codes = torch.round(probs.clamp(0, 1).sqrt() * 255)
        return {PROBS: codes.cpu().numpy().astype(np.uint8)}
    return {PROBS: probs.cpu().numpy().astype(np.float16)}


def decode_attention(stored: dict[str, np.ndarray], encoding: str) -> torch.Tensor:
    """Arrays by role → (R, H, T, T) float32 causal rows that each sum to 1 (see above)."""
    check_attention_encoding(encoding)
    if encoding == "topk":
        keys = torch.from_numpy(stored[KEYS].astype(np.int64))
        kept = torch.from_numpy(stored[PROBS].astype(np.float32))
        block = kept.shape[-2]
        dense = torch.zeros((*kept.shape[:-1], block)).scatter_(-1, keys, kept)
    elif encoding == "q8":
        dense = (torch.from_numpy(stored[PROBS].astype(np.float32)) / 255).square()
    else:
        dense = torch.from_numpy(stored[PROBS].astype(np.float32))
    return fill_rows(dense)


def fill_rows(dense: torch.Tensor) -> torch.Tensor:
    """(..., T, T) partial causal rows → rows summing to 1: the missing mass spread evenly over the
    causal keys that hold nothing, then renormalised."""
    block = dense.shape[-1]
    causal = torch.ones(block, block, dtype=torch.bool).tril()
    dense = dense.clamp(min=0).masked_fill_(~causal, 0)
    # Empty causal keys per row: query t has t + 1 keys (counted, not masked: fewer passes over T × T).
    empty = (torch.arange(1, block + 1).unsqueeze(-1) - (dense != 0).sum(-1, keepdim=True)).clamp(min=1)
    missing = (1 - dense.sum(-1, keepdim=True)).clamp(min=0)  # (..., T, 1)
    dense = torch.where((dense == 0) & causal, missing / empty, dense)
    return dense / dense.sum(-1, keepdim=True).clamp(min=1e-30)


SPARSE_ROLES = ("keys", "above", "fill", "entropy")  # what sparse_attention gives, in order


def sparse_attention(keys, probs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The topk encoding's decoded rows without their T × T matrix, in the form the attention losses
    read: (..., T, K) keys and probabilities as stored (arrays or tensors) → keys (int16; int32 past
    32 767 keys: a quarter of int64's bytes through the loader, widened in the step by
    losses.SparseRows.of), above (..., T, K), fill (..., T), entropy (..., T), all float32 but the keys.
    Row q holds fill[q] at every key 0..q, plus above[q, j] at keys[q, j] (a kept probability minus
    the fill; 0 where nothing is kept); entropy[q] = −Σ_k t log t over the row. These are the rows of
    `decode_attention` (the same fill and renormalisation, here on K + 1 numbers per row). Assumes a
    row's keys are distinct (topk's are). Computed here, in the loader's reader, off the step."""
    # uint16 as stored has few torch ops; the narrowest signed type that holds every key does.
    block = np.shape(keys)[-2]
    keys = torch.as_tensor(np.asarray(keys, dtype=np.int16 if block <= np.iinfo(np.int16).max + 1 else np.int32))
    probs = torch.as_tensor(probs).to(torch.float32, copy=True).clamp_(min=0)  # a copy: edited in place below
    top_k = probs.shape[-1]
    keys_per_query = torch.arange(1, block + 1)  # (T,): query q has q + 1 causal keys
    # Keys above the diagonal place nothing; only queries q < K have fewer causal keys than K.
    early = min(top_k, block)
    probs[..., :early, :].masked_fill_(keys[..., :early, :] >= keys_per_query[:early].unsqueeze(-1), 0)
    kept_mass = probs.sum(-1)  # (..., T)
    kept = probs.sign()  # 1 where a probability is kept, else 0 (probs ≥ 0); sign + sum beats count_nonzero
    empty = keys_per_query - kept.sum(-1)  # causal keys that get the fill
    fill = (1 - kept_mass).clamp(min=0) / empty.clamp(min=1)
    total = (kept_mass + empty * fill).clamp(min=1e-30)
    probs.div_(total.unsqueeze(-1))
    fill = fill / total
    # −Σ t log t: the kept entries (0 log 0 = 0: the clamp only keeps the log finite) and `empty` fills.
    # In place and as a dot product: few T × K temporaries (each a fresh allocation, slow at this size).
    kept_part = torch.linalg.vecdot(probs, probs.clamp(min=1e-30).log_())
    entropy = -(empty * fill * fill.clamp(min=1e-30).log() + kept_part)
    above = probs.sub_(fill.unsqueeze(-1)).mul_(kept)
    return keys, above, fill, entropy
