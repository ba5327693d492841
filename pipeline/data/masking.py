"""Masks for masked LM, fixed at prepare time so that the teacher and every student see the same inputs.

Per block: exactly M = round(mask_rate · T) positions, drawn uniformly among the positions that do not
hold a special token (specials only when fewer than M others exist), sorted. BERT's replacement: 80%
of them become [MASK], 10% a random non-special id, 10% stay as they are; the label is the original
id either way. View v of a split draws from the seed sequence (seed, split, v), so N views are N
differently masked copies and a re-run writes the same bytes.

Shapes: B blocks, T tokens per block, M masked positions per block.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import KdcacheError

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # the rest keep their token


def mask_count(block_size: int, mask_rate: float) -> int:
    """M: masked positions per block (at least 1)."""
    return max(1, min(block_size, round(mask_rate * block_size)))


def positions_dtype(block_size: int):
    return np.uint16 if block_size <= 2**16 else np.int32


def mask_blocks(blocks: np.ndarray, mask_rate: float, views: int, seed: int, split: int, mask_id: int,
                special_ids, vocab_size: int) -> dict[str, np.ndarray]:
    """(B, T) packed ids → `views` masked copies, view-major (row v·B + b is view v of block b):
    input_ids (views·B, T) with the replacements made, mask_positions (views·B, M) and mask_labels
    (views·B, M), the original ids there. split: 0 train, 1 validation (another seed stream)."""
    if mask_id is None:
        raise KdcacheError("masked LM needs a tokenizer with a mask token ([MASK]); use an encoder's tokenizer "
                           "(e.g. a BERT's) or leave --tokenizer empty for the default BPE, which has one.")
    count, (num_blocks, block_size) = mask_count(blocks.shape[1], mask_rate), blocks.shape
    special = np.zeros(max(vocab_size, int(blocks.max(initial=0)) + 1), dtype=bool)
    special[[i for i in special_ids if i is not None and i < len(special)]] = True
    ordinary = np.flatnonzero(~special[:vocab_size])
    parts = {"input_ids": [], "mask_positions": [], "mask_labels": []}
    for view in range(views):
        rng = np.random.default_rng([seed, split, view])
        keys = rng.random((num_blocks, block_size)) + special[blocks]  # specials sort after every other
        positions = np.sort(np.argsort(keys, axis=1, kind="stable")[:, :count], axis=1)  # (B, M)
        labels = np.take_along_axis(blocks, positions, axis=1)
        draw = rng.random((num_blocks, count))
        replaced = np.where(draw < MASK_SHARE, mask_id, labels)
        random_ids = ordinary[rng.integers(0, len(ordinary), size=(num_blocks, count))]
        replaced = np.where((draw >= MASK_SHARE) & (draw < MASK_SHARE + RANDOM_SHARE), random_ids, replaced)
        masked = blocks.copy()
        np.put_along_axis(masked, positions, replaced, axis=1)
        parts["input_ids"].append(masked)
        parts["mask_positions"].append(positions.astype(positions_dtype(block_size)))
        parts["mask_labels"].append(labels)
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}
