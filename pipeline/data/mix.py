"""`prepare --mix`: one token store made of the rows of others (e.g. the corpus and teacher-written data).

Mixing at the token-store level keeps every later stage unchanged: `cache` captures one store, the
loader streams one store's rows, and the row index stays the single key between tokens and targets.
Weights say how many of each store's train rows go in (WEIGHT x rows: whole copies, then a seeded
subset for the fraction); the rows are shuffled (seeded) so every shard holds a mixture. Validation is
the first store's, so students are scored on the same held-out text whatever they trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import PrepareConfig
from pipeline.data.tokens import TokenStore, same_tokenizer, write_token_store
from pipeline.errors import KdcacheError
from pipeline.location import Location


def parse_mix(entry: str) -> tuple[str, float]:
    """DIR or DIR:WEIGHT (a weight only when the part after the last ':' is a number) -> (DIR, WEIGHT)."""
    path, sep, weight = str(entry).rpartition(":")
    if sep:
        try:
            value = float(weight)
        except ValueError:
            return str(entry), 1.0
        if not path:
            raise KdcacheError(f"--mix {entry!r} has a weight but no directory; write DIR:WEIGHT.")
        if value < 0 or not np.isfinite(value):
            raise KdcacheError(f"--mix {entry!r}: the weight must be a number >= 0.")
        return path, value
    return str(entry), 1.0


def pick_rows(rows: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Row indices: floor(weight) copies of every row, then round(fraction x rows) distinct rows."""
    whole = int(weight)
    extra = int(round((weight - whole) * rows))
    return np.concatenate([np.tile(np.arange(rows), whole), np.sort(rng.choice(rows, extra, replace=False))])


def mix_token_stores(config: PrepareConfig, out: str | Path) -> TokenStore:
    """Write the mixture of `config.mix` (DIR[:WEIGHT] entries) as a token store at `out`."""
    Location(out).check_writable()
    entries = [parse_mix(entry) for entry in config.mix]
    stores = [TokenStore(path) for path, _ in entries]  # each refuses an unfinished or foreign directory
    first = stores[0]
    for store in stores:
        if store.task_name != "causal":  # only input_ids are mixed: labels and masks would be lost
            raise KdcacheError(f"--mix {store.path} holds {store.task_name} rows; --mix mixes causal LM "
                               f"token stores only.")
    for store in stores[1:]:
        if store.block_size != first.block_size:
            raise KdcacheError(f"--mix stores have different block sizes: {first.name} {first.block_size}, "
                               f"{store.name} {store.block_size}; mix stores prepared with the same --block-size.")
        if store.vocab_size != first.vocab_size or not same_tokenizer(first, store):
            raise KdcacheError(f"--mix stores have different tokenizers: {first.name} ({first.vocab_size} ids) and "
                               f"{store.name} ({store.vocab_size} ids); prepare or generate them with one tokenizer.")
    rng = np.random.default_rng(0)  # fixed: the mixture depends on its inputs only
    picks = [pick_rows(store.num_rows("train"), weight, rng) for store, (_, weight) in zip(stores, entries)]
    if sum(len(p) for p in picks) == 0:
        raise KdcacheError(f"--mix {' '.join(config.mix)} selects no rows; give a weight above 0.")
    train = np.concatenate([store.blocks("train")[p] for store, p in zip(stores, picks)])
    train = train[rng.permutation(len(train))]
    sources = [{"path": store.name, "fingerprint": store.fingerprint, "weight": weight, "rows": len(p)}
               for store, (_, weight), p in zip(stores, entries, picks)]
    return write_token_store(out, first, {"train": train, "validation": first.blocks("validation")},
                             {"mix": sources})
