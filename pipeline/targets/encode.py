"""Encodings of cached values ⇄ tensors.

Top-k log-probs are stored in one of ENCODINGS; ids in the narrowest unsigned type that holds the
vocabulary; hidden states as float16. Decoding always returns float32 / int64 tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import KdcacheError

ENCODINGS = {
    "fp32": (np.float32, "float32 log-probs: the reference, 4 bytes per kept entry."),
    "fp16": (np.float16, "float16 log-probs: 2 bytes per kept entry, ~3 significant digits."),
}
HIDDEN_DTYPE = np.float16


def check_encoding(name: str) -> None:
    if name not in ENCODINGS:
        raise KdcacheError(f"unknown encoding {name!r}; choose one of {', '.join(ENCODINGS)} "
                           f"(`kdcache encodings` lists them).")


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_topk_logprobs(logprobs: torch.Tensor, encoding: str) -> np.ndarray:
    check_encoding(encoding)
    return logprobs.float().cpu().numpy().astype(ENCODINGS[encoding][0])


def decode_topk_logprobs(stored: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(stored, dtype=np.float32))


def encode_ids(ids: torch.Tensor, vocab_size: int) -> np.ndarray:
    return ids.cpu().numpy().astype(ids_dtype(vocab_size))


def decode_ids(stored: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(stored.astype(np.int64))


def encode_hidden(hidden: torch.Tensor) -> np.ndarray:
    return hidden.float().cpu().numpy().astype(HIDDEN_DTYPE)


def decode_hidden(stored: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(stored, dtype=np.float32))
