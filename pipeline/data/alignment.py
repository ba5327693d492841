"""Align two tokenizations of the same text by character offsets (cross-tokenizer students).

A causal LM's position i predicts token i + 1 after reading the text before that token's first
character. A student position i is aligned with the teacher position j whose next token starts at
the same character: both have read exactly the same text and predict what comes from there on.
Positions with no such partner (the next student token starts inside a teacher token) are unaligned.

Spans are (start, end) character offsets of each token, in one coordinate system for both sides
(e.g. offsets within the same document). Two token stores prepared over the same documents are
aligned over a whole split as one stream (`align_token_stores`): a token's key is (document, start).
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import KdcacheError

ALIGNED = "aligned"  # batch key: (T,) bool, the student positions that have a teacher partner


def align_starts(student_starts: np.ndarray, teacher_starts: np.ndarray) -> np.ndarray:
    """(N_s,), (N_t,) token start keys → (N_s,) int64: for each student position i, the teacher
    position j with teacher_starts[j + 1] == student_starts[i + 1], or −1 (unaligned; the last
    position predicts nothing and is always −1). A negative key is a token that starts no text of its
    own (a later byte piece of one character) and never aligns."""
    student_next = np.asarray(student_starts)[1:]
    teacher_next = np.asarray(teacher_starts)[1:]  # the next token of teacher position j = index j
    aligned = np.full(len(student_next), -1, dtype=np.int64)
    if len(teacher_next):
        order = np.argsort(teacher_next, kind="stable")
        found = np.minimum(np.searchsorted(teacher_next[order], student_next), len(order) - 1)
        hit = (teacher_next[order][found] == student_next) & (student_next >= 0)
        aligned[hit] = order[found][hit]
    return np.concatenate([aligned, [-1]]).astype(np.int64)


def align_positions(student_spans: np.ndarray, teacher_spans: np.ndarray) -> np.ndarray:
    """(N_s, 2), (N_t, 2) token spans → (N_s,) int64 (see align_starts, on the spans' starts)."""
    return align_starts(np.asarray(student_spans)[:, 0], np.asarray(teacher_spans)[:, 0])


def aligned_share(alignment: np.ndarray) -> float:
    """Fraction of student positions that predict something and have a teacher partner."""
    predicting = alignment[:-1] if len(alignment) else alignment
    return float((predicting >= 0).mean()) if len(predicting) else 0.0


def start_keys(doc: np.ndarray, start: np.ndarray) -> np.ndarray:
    """A stream of tokens' documents and start characters (N,) → (N,) int64 keys doc · 2³² + start,
    −1 for a token starting at the same character as the one before it: a byte-level tokenizer cuts
    a character it has no token for into byte pieces that all carry the character's span."""
    keys = (doc.astype(np.int64) << 32) + start.astype(np.int64)
    keys[1:][keys[1:] == keys[:-1]] = -1
    return keys


def check_alignable(student, teacher, split: str) -> None:
    """Refuse two token stores whose `split` positions cannot be aligned by text: a store without
    character offsets, or stores over other documents."""
    for role, store in (("student's", student), ("teacher's", teacher)):
        if store.task_name != "causal":
            raise KdcacheError(f"the {role} token store {store.name} holds {store.task_name} rows; cross-tokenizer "
                               f"students are causal LMs.")
        if not store.has_offsets:
            raise KdcacheError(f"the {role} token store {store.name} has no character offsets (prepared by an older "
                               f"kdcache or with a slow tokenizer, or written by generate / prepare --mix), so its "
                               f"positions cannot be aligned with another tokenizer's; re-run `kdcache prepare "
                               f"--out {store.name}` with the same settings (a fast tokenizer).")
    ours, theirs = (store.meta.get("documents", {}).get(split) for store in (student, teacher))
    if ours != theirs:
        raise KdcacheError(f"the student's token store {student.name} and the teacher's {teacher.name} hold "
                           f"different {split} documents (document hashes {ours} and {theirs}), so their "
                           f"positions cannot be aligned by text. Prepare the student's tokens from the teacher's "
                           f"corpus with the same corpus, max_documents and val_fraction (only tokenizer, "
                           f"vocab_size and block_size may differ).")


def align_token_stores(student, teacher, split: str = "train") -> np.ndarray:
    """Two token stores over the same documents → (N_s, T_s) int64: for every student position, the
    aligned teacher position as row · T_t + position in the teacher's `split`, or −1. Each split is
    read as the stream of its packed blocks, so a row's last position aligns across the row boundary
    (its prediction is the next block's first token, as the teacher's is)."""
    check_alignable(student, teacher, split)
    keys = [start_keys(store.column(split, "doc").reshape(-1), store.column(split, "start").reshape(-1))
            for store in (student, teacher)]
    return align_starts(*keys).reshape(-1, student.block_size)
