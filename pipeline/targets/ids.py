"""Token ids in a targets store: uint16 up to 65 536 ids, else bit-packed at ceil(log2 V) bits.

Also the per-position count of kept top-k entries (top-p trimming) and its padding mask. Decoding
always returns int64 tensors. docs/FORMAT.md says how to unpack with numpy alone.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import KdcacheError

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


# Top-p trimming keeps a per-position count of entries; the rest are padding.

def count_dtype(top_k: int) -> str:
    return "uint8" if top_k <= 255 else "uint16"


def padding(count: np.ndarray, top_k: int) -> np.ndarray:
    """(R, T) kept counts → (R, T, K) bool, true at the padded entries (index ≥ count)."""
    return np.arange(top_k) >= np.asarray(count)[..., None]
