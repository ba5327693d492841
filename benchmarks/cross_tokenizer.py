"""Cross-tokenizer students: ULD + CE from a teacher of another tokenizer vs CE only, at equal steps.

On the embedded default (the stdlib corpus, --max-documents documents): the teacher's token store is
prepared with the teacher's own tokenizer (--teacher DIR reuses a trained default teacher, e.g. `make
run`'s models/teacher; without it one is trained on the `teacher` section of --params for
--teacher-steps steps), captured once (the `cache` section); the student's token store is the same
documents with a default BPE of --student-vocab ids. Two students of the `student` section train for
--steps steps on the student's tokens:

  uld   --teacher-tokens, --loss uld, alpha --alpha (ULD on the aligned positions, CE on all)
  ce    alpha 1 (hard labels only)

Printed: the share of student positions aligned with a teacher position (train and validation), and
each student's val_loss / perplexity on the student's own validation split (`evaluate`, same blocks);
--share-vocabs V ... also prints the aligned share of token stores with those BPE sizes (no training).
Everything is written under --work and reused when present (delete it to start over).

  nice -n 10 python benchmarks/cross_tokenizer.py --teacher /work/bench/teacher --work /tmp/cross-tokenizer
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules

from generated_data import section, timed  # noqa: E402
from pipeline.config import CacheConfig, EvaluateConfig, PrepareConfig, StudentConfig, TeacherConfig  # noqa: E402
from pipeline.data.alignment import align_token_stores, aligned_share  # noqa: E402
from pipeline.data.tokens import TokenStore, prepare_tokens  # noqa: E402
from pipeline.evaluate import run_evaluate  # noqa: E402
from pipeline.student import run_student  # noqa: E402
from pipeline.teacher.capture import run_capture  # noqa: E402
from pipeline.training.teacher import materialise_teacher  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--work", default="/tmp/cross-tokenizer")
    parser.add_argument("--teacher", default="", help="A trained teacher directory to reuse (its tokenizer too).")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--max-documents", type=int, default=150)
    parser.add_argument("--student-vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--share-vocabs", type=int, nargs="*", default=[])
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    prepare = section(PrepareConfig, params["prepare"], max_documents=args.max_documents)
    teacher_tokens, student_tokens = work / "teacher_tokens", work / "student_tokens"
    teacher = Path(args.teacher) if args.teacher else work / "teacher"
    if not (teacher_tokens / "meta.json").exists():  # the teacher's tokenizer when it is given
        timed("prepare teacher tokens", lambda: prepare_tokens(
            replace(prepare, tokenizer=str(teacher) if args.teacher else ""), teacher_tokens))
    if not (teacher / "kdcache.json").exists():
        timed("teacher", lambda: materialise_teacher(section(TeacherConfig, params["teacher"],
                                                             max_steps=args.teacher_steps, eval_every=0),
                                                     str(teacher_tokens), str(teacher)))
    if not (student_tokens / "meta.json").exists():
        timed("prepare student tokens", lambda: prepare_tokens(replace(prepare, vocab_size=args.student_vocab),
                                                               student_tokens))
    targets = work / "targets.zarr"
    timed("cache", lambda: run_capture(section(CacheConfig, params["cache"]), str(teacher), str(teacher_tokens),
                                       str(targets)))
    ours, theirs = TokenStore(student_tokens), TokenStore(teacher_tokens)
    shares = {split: aligned_share(align_token_stores(ours, theirs, split).reshape(-1))
              for split in ("train", "validation")}
    other_shares = {}
    for vocab in args.share_vocabs:
        other = work / f"student_tokens_{vocab}"
        if not (other / "meta.json").exists():
            prepare_tokens(replace(prepare, vocab_size=vocab), other)
        other_shares[vocab] = aligned_share(align_token_stores(TokenStore(other), theirs, "train").reshape(-1))

    student = section(StudentConfig, params["student"], max_steps=args.steps, eval_every=0)
    models = {}
    for seed in range(args.seeds):
        uld_dir, ce_dir = work / f"student_uld_a{args.alpha:g}_s{seed}", work / f"student_ce_s{seed}"
        if not (uld_dir / "kdcache.json").exists():
            timed(f"student uld seed {seed}", lambda: run_student(
                replace(student, loss="uld", alpha=args.alpha, seed=seed), str(student_tokens), str(uld_dir),
                [str(targets)], teacher_tokens=str(teacher_tokens)))
        if not (ce_dir / "kdcache.json").exists():
            timed(f"student ce seed {seed}", lambda: run_student(replace(student, alpha=1.0, seed=seed),
                                                                 str(student_tokens), str(ce_dir)))
        models.update({f"uld_a{args.alpha:g}_s{seed}": str(uld_dir), f"ce_s{seed}": str(ce_dir)})
    result = run_evaluate(EvaluateConfig(batch_size=32, latency_rounds=1, reference="ce_s0"), str(student_tokens),
                          models, str(work / "metrics.json"))["models"]

    print(f"\nteacher: vocabulary {theirs.vocab_size}, {theirs.num_rows('train')} train blocks of {theirs.block_size}; "
          f"student: vocabulary {ours.vocab_size}, {ours.num_rows('train')} train blocks of {ours.block_size} "
          f"({args.max_documents} documents)")
    print(f"aligned share of student positions: train {shares['train']:.3f}, validation {shares['validation']:.3f}")
    for vocab, share in other_shares.items():
        print(f"aligned share (train) of a student BPE of {vocab} ids: {share:.3f}")
    print(f"students: {args.steps} steps, batch {student.batch_size}, n_embd {student.n_embd}, n_layer "
          f"{student.n_layer}; uld: alpha {args.alpha}; scored on the student's validation split "
          f"({ours.num_rows('validation')} blocks)")
    print(f"{'student':>12} {'val_loss':>9} {'ppl':>8} {'ECE':>7}")
    for name, m in result.items():
        print(f"{name:>12} {m['val_loss']:9.4f} {m['perplexity']:8.2f} {m['ece']:7.4f}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
