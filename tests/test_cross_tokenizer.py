"""Cross-tokenizer students: offsets kept by prepare, two real token stores aligned, ULD end to end, refusals."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from pipeline.config import PrepareConfig, StudentConfig
from pipeline.data.alignment import ALIGNED, align_token_stores, aligned_share
from pipeline.data.corpus import iter_documents, split_documents
from pipeline.data.tokens import TokenStore, prepare_tokens, write_token_store
from pipeline.errors import KdcacheError
from pipeline.models import build_gpt2
from pipeline.training.objective import Objective
from tests.conftest import prepare_small
from tests.test_cli import SMALL_STUDENT, assert_nothing_complete, assert_refused


def documents(corpus, val_fraction):
    """The documents of each split, as prepare reads and splits them."""
    train, validation = split_documents(list(iter_documents(str(corpus))), val_fraction)
    return {"train": train, "validation": validation}


@pytest.fixture(scope="module")
def student_tokens(tiny_corpus, tmp_path_factory):
    """The tiny corpus again, with a BPE of another size and another block size than tiny_tokens."""
    out = tmp_path_factory.mktemp("student") / "tokens"
    return prepare_tokens(PrepareConfig(corpus=str(tiny_corpus), vocab_size=500, block_size=24, val_fraction=0.2), out)


def test_prepare_records_offsets_that_reproduce_the_text(tiny_tokens, tiny_corpus):
    texts = documents(tiny_corpus, 0.2)["train"]
    assert tiny_tokens.has_offsets and set(tiny_tokens.meta["documents"]) == {"train", "validation"}
    tokenizer = tiny_tokens.load_tokenizer()
    ids = tiny_tokens.blocks("train").reshape(-1)
    doc, start, end = (tiny_tokens.column("train", name).reshape(-1) for name in ("doc", "start", "end"))
    checked = 0
    for i in range(len(ids)):
        text = texts[doc[i]]
        if ids[i] == tiny_tokens.meta["eos_id"]:  # the separator sits where its document ends
            assert start[i] == end[i] == len(text)
            continue
        piece = tokenizer.decode([int(ids[i])])
        if "\ufffd" not in piece:  # a byte piece of a character decodes to no text of its own
            assert text[start[i]:end[i]] == piece
            checked += 1
    assert checked > 0.9 * len(ids)
    # Each fully packed document is its tokens' spans end to end.
    first_whole = doc[np.argmax(doc > doc[0])]
    spans = [(s, e) for d, s, e in zip(doc, start, end) if d == first_whole]
    assert "".join(texts[first_whole][s:e] for s, e in spans) == texts[first_whole]


def test_two_real_token_stores_align_by_the_next_characters(tiny_tokens, student_tokens):
    assert student_tokens.vocab_size != tiny_tokens.vocab_size
    alignment = align_token_stores(student_tokens, tiny_tokens, "train")  # (N_s, T_s)
    assert alignment.shape == student_tokens.blocks("train").shape
    share = aligned_share(alignment.reshape(-1))
    assert 0.3 < share < 1.0
    student, teacher = (t.load_tokenizer() for t in (student_tokens, tiny_tokens))
    student_ids, teacher_ids = student_tokens.blocks("train").reshape(-1), tiny_tokens.blocks("train").reshape(-1)
    flat = alignment.reshape(-1)
    pairs = np.flatnonzero(flat >= 0)
    for p in pairs[:: max(1, len(pairs) // 500)]:
        q = flat[p]
        # What each side predicts next, from its own ids: text that starts at the same character, so
        # the shorter of the two next tokens begins the longer one.
        ours, theirs = student.decode(student_ids[p + 1:p + 4]), teacher.decode(teacher_ids[q + 1:q + 4])
        shorter = min(len(student.decode([student_ids[p + 1]])), len(teacher.decode([teacher_ids[q + 1]])))
        assert ours[:shorter] == theirs[:shorter]
    # The same tokenization aligns a position with itself, unless its next token is a later byte piece
    # of a character (which starts no text of its own); the split's last position predicts nothing.
    itself = align_token_stores(tiny_tokens, tiny_tokens, "train").reshape(-1)
    assert ((itself[:-1] == np.arange(len(itself) - 1)) | (itself[:-1] == -1)).all() and itself[-1] == -1
    assert aligned_share(itself) > 0.99


def test_stores_that_cannot_be_aligned_are_refused(tiny_tokens, tiny_corpus, tmp_path):
    fewer = prepare_tokens(PrepareConfig(corpus=str(tiny_corpus), vocab_size=400, block_size=24, val_fraction=0.2,
                                         max_documents=5), tmp_path / "fewer")
    with pytest.raises(KdcacheError, match="different train documents.*max_documents"):
        align_token_stores(fewer, tiny_tokens, "train")
    blocks = {split: tiny_tokens.blocks(split) for split in ("train", "validation")}
    no_offsets = write_token_store(tmp_path / "copy", tiny_tokens, blocks, {})  # as generate / --mix write
    with pytest.raises(KdcacheError, match="no character offsets.*kdcache prepare"):
        align_token_stores(no_offsets, tiny_tokens, "train")


def test_uld_objective_keeps_to_aligned_positions_and_chunks_the_same(tiny_tokens):
    torch.manual_seed(0)
    model = build_gpt2(StudentConfig(n_layer=1, n_embd=32, n_head=2), tiny_tokens.vocab_size, 32, 0)
    ids = torch.from_numpy(tiny_tokens.blocks("train")[:2].astype(np.int64))  # (2, 32)
    teacher = torch.softmax(torch.randn(2, 32, 50), -1).sort(-1, descending=True).values
    K = 8
    batch = {"input_ids": ids, "topk_ids": torch.zeros(2, 32, K, dtype=torch.long),
             "topk_logprobs": teacher[..., :K].log(), "tail_logmass": teacher[..., K:].sum(-1).log(),
             ALIGNED: torch.rand(2, 32) < 0.6}
    plain = Objective(vocab_size=tiny_tokens.vocab_size, alpha=0.5, loss="uld")
    parts = plain(model, batch)
    logits = model(input_ids=ids).logits.flatten(0, 1)
    from pipeline.losses import uld_loss

    expected = uld_loss(logits, batch["topk_logprobs"].flatten(0, 1), batch["tail_logmass"].flatten(),
                        batch[ALIGNED].flatten())
    torch.testing.assert_close(parts["kd"], expected)
    assert float(parts["aligned"]) == pytest.approx(float(batch[ALIGNED].float().mean()))
    chunked = Objective(vocab_size=tiny_tokens.vocab_size, alpha=0.5, loss="uld", loss_chunk=20)(model, batch)
    torch.testing.assert_close(chunked["kd"], parts["kd"])
    torch.testing.assert_close(chunked["loss"], parts["loss"])


# --- The command line, on the small pipeline of conftest.py -------------------------------------------

@pytest.fixture(scope="module")
def small_student_tokens(kdcache, small_corpus, tmp_path_factory):
    """The small corpus in the student's own tokenizer: a BPE of another size, blocks of 24."""
    return prepare_small(kdcache, small_corpus, tmp_path_factory.mktemp("small_student") / "tokens", 400, 24)


def test_the_stream_reads_the_teacher_targets_at_the_aligned_positions(small_student_tokens, small_tokens,
                                                                         small_targets):
    from pipeline.targets.reader import TargetsStore
    from pipeline.training.loader import BlockStream

    student, teacher, store = TokenStore(small_student_tokens), TokenStore(small_tokens), TargetsStore(small_targets)
    alignment = align_token_stores(student, teacher, "train")
    names = store.topk_names()
    stream = BlockStream(str(small_student_tokens), "train", [str(small_targets)], [names], rows_per_shard=8,
                         alignment=alignment)
    whole = store.decode(store.read_rows(0, store.rows, names))  # every teacher row, (R_t, T_t, K)
    T = teacher.block_size
    seen = 0
    for item in stream:
        row = int(item["row"])
        assert item["input_ids"].shape == (student.block_size,)
        assert torch.equal(item[ALIGNED], torch.from_numpy(alignment[row] >= 0))
        for position in np.flatnonzero(alignment[row] >= 0):
            q = alignment[row, position]
            for name in ("topk_ids", "topk_logprobs", "tail_logmass"):
                assert torch.equal(item[name][position], whole[name][q // T, q % T])
        seen += 1
    assert seen == student.num_rows("train")


def test_cross_tokenizer_student_trains_with_uld(kdcache, small_student_tokens, small_tokens, small_targets,
                                                 tmp_path):
    out, log = tmp_path / "student", tmp_path / "log.csv"
    result = kdcache("student", "--tokens", small_student_tokens, "--targets", small_targets,
                     "--teacher-tokens", small_tokens, "--loss", "uld", "--alpha", 0.5, "--max-steps", 3,
                     "--log", log, "--out", out, *SMALL_STUDENT)
    assert result.exit_code == 0, result.output
    assert "cross-tokenizer" in result.output
    rows = list(csv.DictReader(log.open()))
    assert len(rows) == 3
    for row in rows:
        assert math.isfinite(float(row["loss"])) and float(row["kd"]) > 0 and 0 < float(row["aligned"]) <= 1
    info = json.loads((out / "kdcache.json").read_text())
    assert 0 < info["aligned_share"] < 1 and info["teacher_tokens_fingerprint"] == TokenStore(small_tokens).fingerprint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings >= TokenStore(small_student_tokens).vocab_size


def test_uld_also_trains_a_student_of_the_teachers_own_tokenizer(kdcache, small_tokens, small_targets, tmp_path):
    log = tmp_path / "log.csv"
    result = kdcache("student", "--tokens", small_tokens, "--targets", small_targets, "--loss", "uld",
                     "--max-steps", 2, "--log", log, "--out", tmp_path / "student", *SMALL_STUDENT)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(log.open()))
    assert all(float(row["kd"]) > 0 for row in rows) and "aligned" not in rows[0]


def test_cross_tokenizer_student_refuses_other_documents(kdcache, small_corpus, small_tokens, small_targets,
                                                         tmp_path):
    # The student's tokenizer over one document fewer.
    other = prepare_small(kdcache, small_corpus, tmp_path / "other_tokens", 400, 24, "--max-documents", 23)
    out = tmp_path / "student"
    result = kdcache("student", "--tokens", other, "--targets", small_targets, "--teacher-tokens", small_tokens,
                     "--loss", "uld", "--max-steps", 1, "--out", out, *SMALL_STUDENT)
    assert_refused(result, "different train documents", "cannot be aligned", "max_documents")
    assert_nothing_complete(out)


@pytest.mark.parametrize("extra, words", [
    (("--loss", "tail_kl"), ("one vocabulary", "--loss uld")),
    (("--loss", "uld", "--beta", 1.0), ("hidden-state", "beta")),
], ids=["id-by-id-loss", "hidden-states"])
def test_cross_tokenizer_student_refuses_what_needs_one_tokenizer(kdcache, small_student_tokens, small_tokens,
                                                                  small_targets, tmp_path, extra, words):
    out = tmp_path / "student"
    result = kdcache("student", "--tokens", small_student_tokens, "--targets", small_targets, "--teacher-tokens",
                     small_tokens, *extra, "--max-steps", 1, "--out", out, *SMALL_STUDENT)
    assert_refused(result, *words)
    assert_nothing_complete(out)
