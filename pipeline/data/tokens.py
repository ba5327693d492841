"""The token store: packed blocks in Arrow IPC files, one per split, plus the tokenizer.

Layout of a token store directory:
  meta.json           fingerprint, vocab_size, block_size, rows per split, settings (written last);
                      a store made from stores keeps its provenance there too (generate: `generated`,
                      prepare --mix: settings.mix)
  {split}.arrow       Arrow IPC file, one column `input_ids`: fixed_size_list<uint16|int32>[block_size]
  tokenizer/          a Hugging Face tokenizer (AutoTokenizer.from_pretrained loads it)

A causal LM store prepared with a fast tokenizer (meta.json `offsets: true`) also holds, per token,
`doc`, `start`, `end` (fixed_size_list<int32>[block_size]): its document's index in the split and its
character span there (a separator after document d spans (len_d, len_d)); meta.json's `documents`
hashes each split's document texts in order. Together they align a store of another tokenizer over the
same documents (data/alignment.py).

meta.json's `task` says what the rows are (absent: causal). A classification store (data/examples.py)
has one example per row: its {split}.arrow also holds `attention_mask` (same shape, uint8) and
`labels` (int32, an index into meta.json's `label_names`). A masked-LM store (data/masking.py) holds
masked blocks in `input_ids` and, beside them, `mask_positions` (fixed_size_list<uint16>[M], sorted)
and `mask_labels` (fixed_size_list<ids>[M], the original ids); meta.json has mask_count (M),
mask_rate, mask_views, mask_id and pad_id. Its train split holds mask_views differently masked copies
of every block, view-major (rows v·B .. (v+1)·B − 1 are view v); validation holds one.

Row i of a split is the unit every later stage indexes by. Reads are memory-mapped, zero-copy.

A token store may live at an fsspec URL (s3://, gs://, ...): it is written locally and uploaded,
meta.json last; a reader copies it once into the local cache (`cache_dir()`, keyed by fingerprint) and
memory-maps it from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
from pipeline.progress import progress

from pipeline.config import PrepareConfig
from pipeline.data.corpus import (BadLines, documents_hash, iter_documents, pack_blocks, pack_offsets,
                                  split_documents)
from pipeline.data.masking import mask_blocks, mask_count
from pipeline.errors import KdcacheError
from pipeline.location import Location
from pipeline.models import load_tokenizer

FORMAT = "kdcache-tokens/1"
SPLITS = ("train", "validation")
EOS = "<|endoftext|>"


def cache_dir() -> Path:
    """Local copies of token stores read from URLs: $KDCACHE_CACHE, else $XDG_CACHE_HOME/kdcache, else
    ~/.cache/kdcache."""
    if os.environ.get("KDCACHE_CACHE"):
        return Path(os.environ["KDCACHE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdcache"


def _local_copy(location: Location) -> Path:
    """The local copy of the token store at a URL, downloaded unless the cache holds its fingerprint."""
    meta = location.read_json("meta.json")
    if meta is None:
        raise KdcacheError(f"{location} is not a finished token store (no meta.json); "
                           f"run `kdcache prepare --out {location}` first.")
    copy = cache_dir() / "tokens" / str(meta.get("fingerprint"))
    if not (copy / "meta.json").exists():
        print(f"[tokens] copying {location} to {copy}")
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=copy.name + ".", dir=copy.parent))
        try:
            location.download(tmp)
            _move_into_place(tmp, copy)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return copy


def _move_into_place(tmp: Path, copy: Path) -> None:
    """Rename a finished local copy into the cache; another process (a loader worker) may have done so first."""
    try:
        tmp.rename(copy)
    except OSError:
        if not (copy / "meta.json").exists():
            raise


class TokenStore:
    def __init__(self, path: str | Path):
        """path: a local directory or an fsspec URL (read through a local copy, see cache_dir)."""
        location = Location(path)
        self.name = location.text  # as given: for messages and provenance
        self.path = Path(location.text) if location.local else _local_copy(location)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise KdcacheError(f"{self.path} is not a finished token store (no meta.json); "
                               f"run `kdcache prepare --out {self.path}` first.")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise KdcacheError(f"{self.name}: token store format {self.meta.get('format')!r}, "
                               f"expected {FORMAT!r}; re-run `kdcache prepare`.")
        self._arrays: dict[str, np.ndarray] = {}

    fingerprint = property(lambda self: self.meta["fingerprint"])
    vocab_size = property(lambda self: self.meta["vocab_size"])
    block_size = property(lambda self: self.meta["block_size"])
    tokenizer_path = property(lambda self: self.path / "tokenizer")
    task_name = property(lambda self: self.meta.get("task", "causal"))
    label_names = property(lambda self: list(self.meta.get("label_names", [])))
    has_offsets = property(lambda self: bool(self.meta.get("offsets")))  # doc/start/end columns (causal LM)

    @property
    def task(self):
        """The task of this store's rows (pipeline/tasks.py)."""
        from pipeline.tasks import get_task

        return get_task(self.task_name)

    @property
    def num_outputs(self) -> int:
        """Size of a target distribution: the vocabulary, or the number of labels for classification."""
        return len(self.label_names) if self.task_name == "classification" else self.vocab_size

    def column(self, split: str, name: str) -> np.ndarray:
        """A column other than the ids (attention_mask (N, T), labels (N,), mask_positions (N, M), ...),
        memory-mapped."""
        key = f"{split}/{name}"
        if key not in self._arrays:
            self.num_rows(split)
            source = pa.memory_map(str(self.path / f"{split}.arrow"))
            table = pa.ipc.open_file(source).read_all()
            if name not in table.column_names:
                raise KdcacheError(f"{self.path} ({self.task_name} rows) has no {name!r} column.")
            column = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(column.type):
                self._arrays[key] = column.values.to_numpy(zero_copy_only=True).reshape(-1, column.type.list_size)
            else:
                self._arrays[key] = column.to_numpy(zero_copy_only=True)
        return self._arrays[key]

    def rows(self, split: str, start: int, stop: int) -> dict:
        """Rows [start, stop) as tensors: input_ids (R, T) int64 and the task's columns as int64
        (classification: attention_mask (R, T), labels (R,); masked LM: mask_positions and mask_labels
        (R, M)): what a model and its task need of a row."""
        import torch

        rows = {"input_ids": torch.from_numpy(self.blocks(split)[start:stop].astype(np.int64))}
        for name in self.task.columns:
            rows[name] = torch.from_numpy(self.column(split, name)[start:stop].astype(np.int64))
        return rows

    def num_rows(self, split: str) -> int:
        if split not in self.meta["rows"]:
            raise KdcacheError(f"token store has no split {split!r}; it has {list(self.meta['rows'])}.")
        return self.meta["rows"][split]

    def blocks(self, split: str) -> np.ndarray:
        """All rows of a split as a memory-mapped (N, block_size) array; no copy is made."""
        if split not in self._arrays:
            self.num_rows(split)
            source = pa.memory_map(str(self.path / f"{split}.arrow"))
            column = pa.ipc.open_file(source).read_all().column("input_ids").combine_chunks()
            self._arrays[split] = column.values.to_numpy(zero_copy_only=True).reshape(-1, self.block_size)
        return self._arrays[split]

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_path)


def train_bpe_tokenizer(texts, vocab_size: int, extra_specials=()):
    """A byte-level BPE trained on `texts`, wrapped so save_pretrained/AutoTokenizer work.
    extra_specials: more special tokens (ids after EOS's 0), e.g. an encoder's [CLS] and [PAD]."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, *extra_specials],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)


def ids_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.int32


def _write_split(path: Path, blocks: np.ndarray, vocab_size: int, columns: dict | None = None) -> None:
    """One Arrow IPC file: input_ids as fixed-size lists, and `columns` (name -> (N, W) array: a
    fixed-size list of W per row; (N,): a plain column) beside them, each in its own dtype."""
    table = {"input_ids": blocks.astype(ids_dtype(vocab_size)), **(columns or {})}
    table = pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
                      if array.ndim == 2 else pa.array(array) for name, array in table.items()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=4096)


def _fingerprint(directory: Path, settings: dict) -> str:
    # skip_bad_lines changes what is read, and so the hashed files, only when it skips a line.
    settings = {key: value for key, value in settings.items() if key != "skip_bad_lines"}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(f.relative_to(directory).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


fingerprint_dir = _fingerprint


def load_named_tokenizer(name: str):
    """The tokenizer of a directory, hub id or GGUF file (models.load_tokenizer) with an error that names it."""
    try:
        return load_tokenizer(name)
    except KdcacheError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/... for a bad id or path
        raise KdcacheError(f"cannot load tokenizer {name!r}: {e}") from e


def prepare_tokens(config: PrepareConfig, out: str | Path) -> TokenStore:
    """Read the corpus, train or load a tokenizer, pack and split into blocks, write the store."""
    if config.task == "classification":  # one labelled example per row
        from pipeline.data.examples import prepare_examples

        return prepare_examples(config, out)
    Location(out).check_writable()
    tokenizer = load_named_tokenizer(config.tokenizer) if config.tokenizer else None
    if config.task == "masked" and tokenizer is not None and tokenizer.mask_token is None:
        raise KdcacheError(f"tokenizer {config.tokenizer!r} has no mask token, which --task masked needs; use "
                           f"the masked-LM teacher's tokenizer (e.g. a BERT's) or leave --tokenizer empty for the "
                           f"default BPE, which gains [MASK]/[CLS]/[SEP]/[PAD].")
    texts, bad = [], BadLines(config.skip_bad_lines)
    for text in progress(iterable=iter_documents(config.corpus, config.text_field, bad), desc="read corpus",
                         unit="doc"):
        if config.max_documents and len(texts) >= config.max_documents:
            break
        texts.append(text)
    bad.report()
    train, validation = split_documents(texts, config.val_fraction)
    documents = {"train": train, "validation": validation}
    if not documents["train"]:
        raise KdcacheError(f"corpus {config.corpus!r} gave no training documents (is it empty?).")
    if not documents["validation"]:
        raise KdcacheError(f"corpus {config.corpus!r} has a single document; at least two are needed "
                           f"to hold one out for validation.")

    if tokenizer is None and config.task == "masked":
        from pipeline.data.examples import encoder_tokenizer

        tokenizer = encoder_tokenizer(documents["train"], config.vocab_size)
    elif tokenizer is None:
        tokenizer = train_bpe_tokenizer(documents["train"], config.vocab_size)
    vocab_size = len(tokenizer)
    # Between documents: end of text, or [SEP] for an encoder tokenizer that has no end-of-text token.
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id

    tmp = _staging(out)
    try:
        tokenizer.save_pretrained(tmp / "tokenizer")
        rows, columns = {}, None
        # Character offsets let a student of another tokenizer align with these positions (causal LM).
        with_offsets = config.task == "causal" and tokenizer.is_fast
        for index, split in enumerate(SPLITS):
            encoded, spans = _encode(tokenizer, documents[split], with_offsets)
            blocks = pack_blocks(progress(iterable=encoded, desc=f"pack {split}", unit="doc"), config.block_size,
                                 separator)
            if len(blocks) == 0:
                raise KdcacheError(f"the {split} split is shorter than one block of {config.block_size} "
                                   f"tokens; use a larger corpus or a smaller block_size.")
            if with_offsets:
                columns = pack_offsets(spans, [len(text) for text in documents[split]], config.block_size,
                                       separator is not None)
            if config.task == "masked":  # validation: one view (the same masks for every model and run)
                columns = mask_blocks(blocks, config.mask_rate, config.mask_views if split == "train" else 1,
                                      config.mask_seed, index, tokenizer.mask_token_id, tokenizer.all_special_ids,
                                      vocab_size)
                blocks = columns.pop("input_ids")
                columns["mask_labels"] = columns["mask_labels"].astype(ids_dtype(vocab_size))
            _write_split(tmp / f"{split}.arrow", blocks, vocab_size, columns)
            rows[split] = len(blocks)
        settings = {**asdict(config), "vocab_size": vocab_size}
        meta = {"format": FORMAT, "fingerprint": _fingerprint(tmp, settings), "vocab_size": vocab_size,
                "block_size": config.block_size, "eos_id": tokenizer.eos_token_id, "rows": rows,
                "settings": settings, "skipped_lines": bad.count, "offsets": with_offsets,
                "documents": {split: documents_hash(documents[split]) for split in SPLITS}}
        if config.task == "masked":
            meta.update(task="masked", mask_count=mask_count(config.block_size, config.mask_rate),
                        mask_rate=config.mask_rate, mask_views=config.mask_views, mask_id=tokenizer.mask_token_id,
                        pad_id=tokenizer.pad_token_id)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written store behind
        raise
    return _publish(tmp, out)


def _encode(tokenizer, texts: list[str], with_offsets: bool, chunk: int = 256) -> tuple[list, list]:
    """(token ids per document, and with_offsets each document's token spans (n, 2) int32, else []).
    Chunks of documents, so the tokenizer's per-token offset tuples never all sit in memory at once."""
    ids, spans = [], []
    for lo in range(0, len(texts), chunk):
        encoded = tokenizer(texts[lo:lo + chunk], add_special_tokens=False, return_offsets_mapping=with_offsets)
        ids.extend(encoded["input_ids"])
        if with_offsets:
            spans.extend(np.asarray(offsets, dtype=np.int32).reshape(-1, 2) for offsets in encoded["offset_mapping"])
    return ids, spans


def _staging(out: str | Path) -> Path:
    """An empty directory to write the store to: OUT.partial beside a local OUT, a temporary one for a URL."""
    location = Location(out)
    if not location.local:
        return Path(tempfile.mkdtemp(prefix="kdcache-tokens-"))
    tmp = Path(location.text).with_name(Path(location.text).name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, out: str | Path) -> TokenStore:
    """Move a finished staging directory into place: a token store that exists (has meta.json) is
    complete. At a URL: uploaded, meta.json last."""
    location = Location(out)
    if location.local:
        shutil.rmtree(location.text, ignore_errors=True)
        tmp.rename(location.text)
        return TokenStore(location.text)
    try:
        location.upload(tmp, last="meta.json")
    finally:
        shutil.rmtree(tmp)
    return TokenStore(out)  # copied into the local cache


def same_tokenizer(a: TokenStore | str | Path, b: TokenStore | str | Path) -> bool:
    """Whether two token stores (or tokenizer directories) map every string to the same ids."""
    from transformers import AutoTokenizer

    vocabularies = [AutoTokenizer.from_pretrained(x.tokenizer_path if isinstance(x, TokenStore) else x).get_vocab()
                    for x in (a, b)]
    return vocabularies[0] == vocabularies[1]


def write_token_store(out: str | Path, source: TokenStore, splits: dict[str, np.ndarray], settings: dict,
                      columns: dict[str, dict] | None = None, **meta) -> TokenStore:
    """Write a token store from ready blocks (split -> (N, block_size) ids) with `source`'s tokenizer.

    For stores made from other stores (generate, prepare --mix, a classification teacher's masked-LM
    pre-training): `settings` and the extra `meta` keys (provenance, task) go into meta.json and the
    fingerprint; `columns` (split -> name -> array) beside the ids. Written to OUT.partial and renamed,
    so a store that exists is complete.
    """
    tmp = _staging(out)
    try:
        shutil.copytree(source.tokenizer_path, tmp / "tokenizer")
        for split in SPLITS:
            _write_split(tmp / f"{split}.arrow", splits[split], source.vocab_size, (columns or {}).get(split))
        record = {"format": FORMAT, "fingerprint": _fingerprint(tmp, {**settings, **meta}),
                  "vocab_size": source.vocab_size, "block_size": source.block_size,
                  "eos_id": source.meta.get("eos_id"),
                  "rows": {split: int(len(splits[split])) for split in SPLITS}, "settings": settings, **meta}
        (tmp / "meta.json").write_text(json.dumps(record, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written store behind
        raise
    return _publish(tmp, out)
