"""Labelled examples for sequence classification: a source → (text, label) records → padded rows.

Sources:
  stdlib                       the embedded default task: which top-level standard-library package a
                               chunk of source comes from (STDLIB_PACKAGES; chunks of CHUNK_LINES lines)
  PATH or GLOB                 .jsonl / .parquet records with --text-field and --label-field
  hf:NAME[:CONFIG][:SPLIT]     a Hugging Face dataset with those two columns

Each example becomes one row of the token store: its ids truncated or padded to block_size, an
attention mask, and the index of its label among the label names (sorted, from the train split).
The split is stratified by label and keeps each split key whole (for stdlib the file, so no file has
chunks on both sides; for other sources the text): split_examples.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import PrepareConfig
from pipeline.data.corpus import (BadLines, hash_bucket, iter_jsonl, load_hf_dataset, pack_blocks, resolve_files,
                                  stdlib_files)
from pipeline.data.masking import mask_blocks, mask_count
from pipeline.errors import KdcacheError
from pipeline.location import Location
from pipeline.progress import progress

# Packages with enough source for a few hundred chunks each (encodings and pydoc_data are data tables).
STDLIB_PACKAGES = ("asyncio", "concurrent", "ctypes", "email", "http", "importlib", "json", "logging",
                   "multiprocessing", "re", "tkinter", "unittest", "urllib", "wsgiref", "xml", "xmlrpc")
CHUNK_LINES = 24
# Specials of the default BPE for encoder tasks: [CLS] text [SEP], padded with [PAD].
CLS, SEP, PAD, MASK = "[CLS]", "[SEP]", "[PAD]", "[MASK]"
ENCODER_SPECIALS = (PAD, CLS, SEP, MASK)


def stdlib_examples() -> list[tuple[str, str, str]]:
    """(text, package, file) for every CHUNK_LINES-line chunk of the chosen stdlib packages' sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    examples = []
    for path in stdlib_files():
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in STDLIB_PACKAGES:
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for start in range(0, len(lines), CHUNK_LINES):
            chunk = "\n".join(lines[start:start + CHUNK_LINES])
            if chunk.strip():
                examples.append((chunk, parts[0], str(path.relative_to(root))))
    return examples


def _records_of_file(path: Path, text_field: str, label_field: str, bad: BadLines):
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for line_no, record in iter_jsonl(path, bad):
            yield record, f"{path}:{line_no}"
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for field in (text_field, label_field):
            if field not in table.column_names:
                raise KdcacheError(f"{path} has no {field!r} column (columns: {table.column_names}); "
                                   f"name the right ones with --text-field / --label-field.")
        for i, record in enumerate(table.select([text_field, label_field]).to_pylist()):
            yield record, f"{path} row {i}"
    else:
        raise KdcacheError(f"{path}: a classification corpus is .jsonl or .parquet records (or hf:NAME), "
                           f"not {suffix!r}.")


def _records_of_hf(spec: str):
    for i, record in enumerate(load_hf_dataset(spec)):
        yield record, f"hf:{spec} row {i}"


def read_examples(source: str, text_field: str, label_field: str,
                  bad: BadLines | None = None) -> list[tuple[str, str, str]]:
    """(text, label as a string, split key) of every record; refuses records without text or label.
    bad: what to do with .jsonl lines that cannot be read (default: stop, naming file and line)."""
    if source == "stdlib":
        return stdlib_examples()
    bad = bad or BadLines()
    records = (_records_of_hf(source[3:]) if source.startswith("hf:")
               else (r for f in resolve_files(source) for r in _records_of_file(f, text_field, label_field, bad)))
    examples = []
    for record, where in records:
        for field, what in ((text_field, "--text-field"), (label_field, "--label-field")):
            if record.get(field) is None:
                raise KdcacheError(f"{where} has no {field!r} field (fields: {sorted(record)}); every "
                                   f"record needs a text and a label: name them with {what}.")
        text = str(record[text_field])
        examples.append((text, str(record[label_field]), text))
    return examples


def split_examples(examples, val_fraction: float):
    """Deterministic (train, validation), stratified by label, whole split keys on one side.

    Each label's keys (for stdlib its files, so no file has chunks on both sides) are held out in hash
    order, skipping any that would take the label's validation share past val_fraction of its
    examples (if every key is larger than that, its smallest key, when it holds at most a third); a
    label with one key keeps it for training. A split by key alone let one large file decide
    a label: the stdlib validation split was 38% `logging`, a package with 1% of the training rows.
    """
    sizes: dict[str, dict[str, int]] = {}  # label -> key -> examples
    for _, label, key in examples:
        sizes.setdefault(label, {}).setdefault(key, 0)
        sizes[label][key] += 1
    held = set()
    for label, keys in sizes.items():
        total, room, mine = sum(keys.values()), val_fraction * sum(keys.values()), []
        for key in sorted(keys, key=lambda k: (hash_bucket(k), k))[:-1]:  # the last stays for training
            if keys[key] <= room:
                mine.append(key)
                room -= keys[key]
        smallest = min(keys, key=lambda k: (keys[k], k))
        if not mine and len(keys) > 1 and val_fraction > 0 and 3 * keys[smallest] <= total:
            mine = [smallest]  # every key is larger than the share: the smallest, if a third at most
        held.update(mine)
    if not held:  # at least one held out
        keys = sorted({key for _, _, key in examples})
        if len(keys) >= 2:
            held = {min(keys, key=hash_bucket)}
    train = [(t, label) for t, label, key in examples if key not in held]
    return train, [(t, label) for t, label, key in examples if key in held]


def label_names_of(train, validation, source: str) -> list[str]:
    """Sorted label names of the train split (numerically when all are integers); refuses a validation
    label the train split never shows (no model could learn it)."""
    names = sorted({label for _, label in train},
                   key=lambda n: (0, int(n), "") if n.lstrip("-").isdigit() else (1, 0, n))
    unseen = sorted({label for _, label in validation} - set(names))
    if unseen:
        raise KdcacheError(f"corpus {source!r}: validation labels {unseen[:10]} never occur in the train split; "
                           f"add training examples of them or drop those records.")
    if len(names) < 2:
        raise KdcacheError(f"corpus {source!r} has {len(names)} label(s) in its train split ({names}); "
                           f"classification needs at least two (is --label-field right?).")
    return names


def encode_examples(tokenizer, texts: list[str], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts → ids (N, T) and attention mask (N, T) uint8: the tokenizer's specials, truncated/padded to T.
    Padded on the right whatever the tokenizer's default: the BiLSTM packs rows by length from the left."""
    encoded = tokenizer(texts, truncation=True, max_length=block_size, padding="max_length", padding_side="right")
    return (np.asarray(encoded["input_ids"], dtype=np.int64),
            np.asarray(encoded["attention_mask"], dtype=np.uint8))


def encoder_tokenizer(texts, vocab_size: int):
    """The default BPE with [PAD]/[CLS]/[SEP]/[MASK]: encodes one text as [CLS] ids [SEP]."""
    from tokenizers.processors import TemplateProcessing

    from pipeline.data.tokens import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, vocab_size, extra_specials=ENCODER_SPECIALS)
    backend = tokenizer.backend_tokenizer
    backend.post_processor = TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B {SEP}",
        special_tokens=[(CLS, backend.token_to_id(CLS)), (SEP, backend.token_to_id(SEP))])
    tokenizer.add_special_tokens({"pad_token": PAD, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK})
    return tokenizer


def write_example_split(path: Path, ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, vocab_size: int) -> None:
    """One Arrow IPC file: input_ids and attention_mask (fixed-size lists of T) and labels (int32)."""
    from pipeline.data.tokens import _write_split

    _write_split(path, ids, vocab_size, {"attention_mask": mask, "labels": labels.astype(np.int32)})


def prepare_examples(config: PrepareConfig, out: str | Path):
    """`prepare --task classification`: read, split, tokenize and write the labelled token store."""
    from pipeline.data.tokens import FORMAT, SPLITS, _publish, _staging, fingerprint_dir, load_named_tokenizer

    Location(out).check_writable()
    bad = BadLines(config.skip_bad_lines)
    examples = read_examples(config.corpus, config.text_field, config.label_field, bad)
    bad.report()
    # A deterministic shuffle by content, so that max_documents keeps a mix of every label.
    examples.sort(key=lambda e: (hash_bucket(e[0] + e[1]), e[0]))
    if config.max_documents:
        examples = examples[:config.max_documents]
    train, validation = split_examples(examples, config.val_fraction)
    if not train or not validation:
        raise KdcacheError(f"corpus {config.corpus!r} gave {len(train)} training and {len(validation)} validation "
                           f"examples; it needs both (use more records or another --val-fraction).")
    names = label_names_of(train, validation, config.corpus)
    if config.tokenizer:
        tokenizer = load_named_tokenizer(config.tokenizer)
        if tokenizer.pad_token is None:  # a decoder's (GPT-2, Llama): pad with its end of text, as its classifiers do
            if tokenizer.eos_token is None:
                raise KdcacheError(f"tokenizer {config.tokenizer!r} has neither a pad nor an end-of-text token, "
                                   f"one of which classification rows need to be padded with; use a tokenizer "
                                   f"that has one, or leave --tokenizer empty.")
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = encoder_tokenizer([t for t, _ in train], config.vocab_size)
    index = {name: i for i, name in enumerate(names)}
    tmp = _staging(out)
    try:
        tokenizer.save_pretrained(tmp / "tokenizer")
        rows, counts = {}, {}
        for split, part in zip(SPLITS, (train, validation)):
            texts = [t for t, _ in progress(iterable=part, desc=f"tokenize {split}", unit="example")]
            ids, mask = encode_examples(tokenizer, texts, config.block_size)
            labels = np.asarray([index[label] for _, label in part], dtype=np.int64)
            write_example_split(tmp / f"{split}.arrow", ids, mask, labels, len(tokenizer))
            rows[split] = len(part)
            counts[split] = np.bincount(labels, minlength=len(names)).tolist()
        settings = {**asdict(config), "vocab_size": len(tokenizer)}
        meta = {"format": FORMAT, "fingerprint": fingerprint_dir(tmp, settings), "vocab_size": len(tokenizer),
                "block_size": config.block_size, "eos_id": tokenizer.eos_token_id, "rows": rows,
                "settings": settings, "task": "classification", "label_names": names,
                "label_counts": counts, "pad_id": tokenizer.pad_token_id, "skipped_lines": bad.count}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written store behind
        raise
    return _publish(tmp, out)


def masked_lm_store(tokens, out: str | Path, mask_rate: float = 0.15, seed: int = 0):
    """A masked-LM token store of a classification store's text, for pre-training its default teacher.

    Each split's examples, unpadded ([CLS] text [SEP] as encoded), are packed into blocks of the same
    size and masked as `prepare --task masked` masks (exactly round(mask_rate · T) positions per block,
    80/10/10, specials never masked); the store shares the tokenizer, so the encoder it trains reads
    the classification rows' ids.
    """
    from pipeline.data.tokens import ids_dtype, write_token_store

    tokenizer = tokens.load_tokenizer()
    splits, columns = {}, {}
    for index, split in enumerate(("train", "validation")):
        ids, attention = tokens.blocks(split), tokens.column(split, "attention_mask").astype(bool)
        blocks = pack_blocks((row[keep].tolist() for row, keep in zip(ids, attention)), tokens.block_size, None)
        if len(blocks) == 0:
            raise KdcacheError(f"the {split} split's text is shorter than one block of {tokens.block_size} tokens: "
                               f"too little to pre-train on; set --mlm-steps 0.")
        masked = mask_blocks(blocks, mask_rate, 1, seed, index, tokenizer.mask_token_id, tokenizer.all_special_ids,
                             tokens.vocab_size)
        splits[split] = masked.pop("input_ids")
        columns[split] = {**masked, "mask_labels": masked["mask_labels"].astype(ids_dtype(tokens.vocab_size))}
    return write_token_store(out, tokens, splits, {"mask_rate": mask_rate, "mask_seed": seed}, columns,
                             task="masked", mask_count=mask_count(tokens.block_size, mask_rate), mask_rate=mask_rate,
                             mask_views=1, mask_id=tokenizer.mask_token_id, pad_id=tokenizer.pad_token_id,
                             pretraining_text_of=tokens.fingerprint)
