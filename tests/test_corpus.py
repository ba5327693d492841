"""Corpus sources, the deterministic split, packing, and the Arrow token store."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import PrepareConfig
from pipeline.data.corpus import iter_documents, pack_blocks, split_documents, stdlib_files
from pipeline.errors import KdcacheError
from pipeline.data.tokens import TokenStore, prepare_tokens

DOCS = [f"def function_{i}(x):\n    return x * {i}\n" for i in range(6)]


def test_stdlib_source_is_real_python_without_tests():
    files = stdlib_files()
    assert len(files) > 100
    assert not any("test" in part for f in files for part in f.parts[-2:-1] if part in ("test", "tests"))
    first = next(iter_documents("stdlib"))
    compile(first, "first", "exec")  # real Python source


def test_txt_jsonl_parquet_sources(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS[1:3]) + "\n")
    pq.write_table(pa.table({"text": DOCS[3:6]}), tmp_path / "c.parquet")
    assert list(iter_documents(str(tmp_path))) == DOCS
    assert list(iter_documents(str(tmp_path / "*.jsonl"))) == DOCS[1:3]


def test_jsonl_without_text_field_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KdcacheError, match="bad.jsonl:1 has no 'text' field"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


def test_hugging_face_dataset_sources_from_local_copies(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(saved))
    assert list(iter_documents(f"hf:{saved}")) == DOCS
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    assert list(iter_documents(f"hf:{files}::train")) == DOCS


def test_split_is_deterministic_and_independent_of_the_rest_of_the_corpus():
    docs = [f"document number {i}" for i in range(200)]
    train, val = split_documents(docs, 0.1)
    assert 5 < len(val) < 40 and len(train) + len(val) == 200
    _, val_subset = split_documents(docs[:100], 0.1)
    assert set(val_subset) == set(val) & set(docs[:100])


def test_pack_blocks_separates_documents_and_drops_the_remainder():
    blocks = pack_blocks(iter([[1, 2, 3], [4, 5]]), block_size=3, eos_id=0)
    np.testing.assert_array_equal(blocks, [[1, 2, 3], [0, 4, 5]])


def test_token_store_round_trip(tiny_tokens, tiny_corpus):
    store = TokenStore(tiny_tokens.path)
    blocks = store.blocks("train")
    assert blocks.shape == (store.num_rows("train"), 32) and blocks.dtype == np.uint16
    assert int(blocks.max()) < store.vocab_size
    train_docs, _ = split_documents(list(iter_documents(str(tiny_corpus))), 0.2)
    decoded = store.load_tokenizer().decode(blocks[:3].reshape(-1).tolist())
    assert "<|endoftext|>".join(train_docs).startswith(decoded)  # byte-level BPE is lossless
    again = prepare_tokens(PrepareConfig(corpus=str(tiny_corpus), vocab_size=300, block_size=32, val_fraction=0.2),
                           tiny_tokens.path.parent / "again")
    assert again.fingerprint == store.fingerprint  # same corpus + settings -> same fingerprint
    np.testing.assert_array_equal(again.blocks("validation"), store.blocks("validation"))
