"""Corpus sources → documents → packed token blocks.

A source is one of:
  stdlib                       the .py files of the running interpreter's standard library (no tests)
  PATH or GLOB                 .txt (one document per file), .jsonl / .parquet (a `text` field per record,
                               or the field given as text_field)
  hf:NAME[:CONFIG][:SPLIT]     a Hugging Face dataset (hub id, local dataset dir, or save_to_disk dir)
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import KdcacheError

TEXT_FIELD = "text"
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py") if not _STDLIB_SKIP & set(f.relative_to(root).parts))


class BadLines:
    """A line of a corpus file that cannot be read (not UTF-8, not JSON): stop, naming the file and line
    (the default), or skip it and count it (`prepare --skip-bad-lines`)."""

    def __init__(self, skip: bool = False):
        self.skip, self.count, self.first = skip, 0, ""

    def found(self, path: Path, line_no: int, why: str) -> None:
        if not self.skip:
            raise KdcacheError(f"{path}:{line_no} {why}; fix or remove that line, or pass --skip-bad-lines "
                               f"to skip such lines (they are counted).")
        self.count += 1
        self.first = self.first or f"{path}:{line_no} {why}"

    def report(self) -> None:
        if self.count:
            print(f"[prepare] skipped {self.count} bad lines (--skip-bad-lines); the first: {self.first}")


def _read_text(path: Path, bad: BadLines) -> str:
    """A .txt file as UTF-8; with bad.skip, its lines that are not UTF-8 are left out."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    kept = []
    for line_no, line in enumerate(data.splitlines(keepends=True), 1):
        try:
            kept.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad.found(path, line_no, "is not UTF-8 text")
    return "".join(kept)


def iter_jsonl(path: Path, bad: BadLines) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line of a .jsonl file; lines that are not UTF-8, not
    JSON or not a JSON object go to `bad`."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.found(path, line_no, "is not UTF-8 text")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                bad.found(path, line_no, f"is not JSON ({error.msg}, column {error.colno})")
                continue
            if not isinstance(record, dict):
                bad.found(path, line_no, f"is not a JSON object (a {type(record).__name__})")
                continue
            yield line_no, record


def _iter_file(path: Path, text_field: str = TEXT_FIELD, bad: BadLines | None = None) -> Iterator[str]:
    suffix, bad = path.suffix.lower(), bad or BadLines()
    if suffix in (".py", ".md"):  # the stdlib source
        yield path.read_text(encoding="utf-8", errors="replace")
    elif suffix == ".txt":
        yield _read_text(path, bad)
    elif suffix == ".jsonl":
        for line_no, record in iter_jsonl(path, bad):
            if text_field not in record:
                raise KdcacheError(f"{path}:{line_no} has no '{text_field}' field (fields: {sorted(record)}); "
                                   f"every JSONL record needs one, or set --text-field.")
            yield record[text_field]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
        if text_field not in columns:
            raise KdcacheError(f"{path} has no '{text_field}' column (columns: {columns}); set --text-field.")
        yield from pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    else:
        raise KdcacheError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or .parquet.")


def load_hf_dataset(spec: str):
    """The split of a Hugging Face dataset that NAME[:CONFIG][:SPLIT] names (hub id, local dataset dir,
    or save_to_disk dir; split train by default)."""
    import datasets

    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    if (Path(name) / "dataset_info.json").exists() or (Path(name) / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(name)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the library raises many types; all mean "cannot load"
        raise KdcacheError(f"cannot load Hugging Face dataset {spec!r}: {e}") from e


def _iter_hf(spec: str, text_field: str = TEXT_FIELD) -> Iterator[str]:
    ds = load_hf_dataset(spec)
    if text_field not in ds.column_names:
        raise KdcacheError(f"dataset {spec!r} has no '{text_field}' column (columns: {ds.column_names}); "
                           f"set --text-field.")
    for record in ds:
        yield record[text_field]


def resolve_files(source: str) -> list[Path]:
    """The files a path/glob source names, sorted; raises when it names none."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".jsonl", ".parquet"))
    else:
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if not files:
        raise KdcacheError(f"corpus {source!r} matches no files; give 'stdlib', an existing path or glob "
                           f"of .txt/.jsonl/.parquet files, or hf:NAME.")
    return files


def corpus_fingerprint(source: str) -> dict:
    """What a source reads from this machine's disk, summarised, so that DVC's `inputs` stage notices a
    corpus file added, removed or edited (a path in params.yaml is not a DVC dependency by itself).
    A hub dataset is remote: its name is all there is to record."""
    from pipeline.models import hash_files  # torch-heavy: only the inputs stage needs it

    if source == "stdlib":
        root, files = Path(sysconfig.get_paths()["stdlib"]), stdlib_files()
        return {"source": source, "python": sysconfig.get_python_version(), "files": len(files),
                "sha256": hash_files((str(f.relative_to(root)), f) for f in files)}
    if source.startswith("hf:"):
        local = Path(source[3:].split(":")[0])
        if not local.is_dir():
            return {"source": source, "remote": True}
        files = sorted(p for p in local.rglob("*") if p.is_file())
    else:
        files = resolve_files(source)
    return {"source": source, "files": len(files), "sha256": hash_files((str(f), f) for f in files)}


def iter_documents(source: str, text_field: str = TEXT_FIELD, bad: BadLines | None = None) -> Iterator[str]:
    """Yield non-empty documents of a source, in a deterministic order (text_field: see module doc).
    bad: what to do with unreadable lines of .txt/.jsonl files (default: stop, naming file and line)."""
    if source == "stdlib":
        files = stdlib_files()
        texts = (t for f in files for t in _iter_file(f))
    elif source.startswith("hf:"):
        texts = _iter_hf(source[3:], text_field)
    else:
        texts = (t for f in resolve_files(source) for t in _iter_file(f, text_field, bad))
    for text in texts:
        if text and text.strip():
            yield text


def hash_bucket(text: str) -> float:
    """A document's place in [0, 1), from its content alone."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "little") / 2**64


def split_documents(texts: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic (train, validation) split by content hash: a document always lands on the same
    side whatever else is in the corpus. A small corpus whose hashes all miss still gets one
    validation document (the lowest bucket), so evaluation is never empty."""
    buckets = [hash_bucket(t) for t in texts]
    is_val = [b < val_fraction for b in buckets]
    if len(texts) >= 2 and not any(is_val):
        is_val[buckets.index(min(buckets))] = True
    train = [t for t, v in zip(texts, is_val) if not v]
    return train, [t for t, v in zip(texts, is_val) if v]


def pack_blocks(token_lists: Iterator[list[int]], block_size: int, eos_id: int | None) -> np.ndarray:
    """Concatenate documents (EOS-separated) and cut into full blocks: (N, block_size) int64.

    The incomplete last block is dropped, as in GPT-2-style pretraining.
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    n = len(stream) // block_size
    return np.asarray(stream[: n * block_size], dtype=np.int64).reshape(n, block_size)


def pack_offsets(spans: list[np.ndarray], lengths: list[int], block_size: int,
                 separated: bool) -> dict[str, np.ndarray]:
    """Where each token of `pack_blocks` (same documents, same separator) comes from: `doc` (index of
    its document in the split) and `start`, `end` (its character span there), each (N, block_size)
    int32. spans: per document, its tokens' (start, end) as (n, 2); lengths: documents' characters. A
    separator after document d spans (len_d, len_d) of d, so it is where d's text ends."""
    docs, pieces = [], []
    for index, (span, length) in enumerate(zip(spans, lengths)):
        span = np.asarray(span, dtype=np.int32).reshape(-1, 2)
        if separated:
            span = np.concatenate([span, np.array([[length, length]], dtype=np.int32)])
        docs.append(np.full(len(span), index, dtype=np.int32))
        pieces.append(span)
    doc, span = np.concatenate(docs), np.concatenate(pieces)
    n = len(doc) // block_size * block_size  # the incomplete last block is dropped, as in pack_blocks
    return {"doc": doc[:n].reshape(-1, block_size), "start": span[:n, 0].reshape(-1, block_size),
            "end": span[:n, 1].reshape(-1, block_size)}


def documents_hash(texts: list[str]) -> str:
    """The identity of a list of documents, in order: two token stores with the same hash per split were
    prepared over the same text, whatever their tokenizers (what cross-tokenizer alignment needs)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]
