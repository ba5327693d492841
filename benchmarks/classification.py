"""Classification distillation on the embedded default task (which stdlib package a chunk comes from).

One run: prepare --task classification → the default BERT teacher (--mlm-steps of masked-LM
pre-training on the train split's text, then --teacher-steps on the labels) → one capture (every class, P = 1)
→ students at equal steps, all from that one store:

  kd_bert / ce_bert   a small BERT classifier with KD (alpha --alpha) / on hard labels only
  kd_lstm / ce_lstm   a BiLSTM classifier (--arch lstm), the same two ways
  kd_bert_tau{t}      the KD BERT at training temperatures t (no recapture: the store holds every class)

With --teacher-model DIR the teacher is that pretrained model instead (any AutoModelForSequenceClassification
base: an encoder, or a decoder such as SmolLM2), fine-tuned with a new head for --teacher-steps (`teacher
--model DIR --finetune`); the tokens use its tokenizer. --train-rows keeps the first N training rows (a
mix of every label: rows are ordered by content hash) to bound a slow teacher's fine-tuning and capture;
--heldout-rows then also evaluates on the next rows (held-out chunks of the training files, where the
validation split holds other files).
--seeds trains every student once per seed; the table then gives each seed and the mean ± spread (max − min).

Printed side by side: accuracy, macro-F1, ECE, agreement with the teacher, parameters, bytes on disk,
CPU latency per example (one example, batch 1, models timed in interleaved rounds; the machine may be
shared), the KD/CE ratios per student kind, the teacher/BiLSTM latency ratio, and the store's bytes
per row by array. Everything is written under --work (re-running reuses nothing: a fresh run).

  python benchmarks/classification.py --work /tmp/cls-bench
  python benchmarks/classification.py --work /tmp/cls-real --block-size 64 --teacher-model /work/rq-smollm2/smollm2 \
      --teacher-steps 120 --teacher-batch 8 --teacher-lr 5e-5 --train-rows 2000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.config import CacheConfig, EvaluateConfig, PrepareConfig, StudentConfig, TeacherConfig
from pipeline.data.tokens import TokenStore, prepare_tokens, write_token_store
from pipeline.evaluate import run_evaluate
from pipeline.student import run_student
from pipeline.teacher.capture import run_capture
from pipeline.training.teacher import materialise_teacher


def store_bytes_per_row(path: Path, rows: int) -> dict[str, float]:
    """Bytes on disk per row of each array directory of a zarr store, and the total."""
    sizes = {}
    for array in sorted(p for p in path.iterdir() if p.is_dir()):
        sizes[array.name] = sum(f.stat().st_size for f in array.rglob("*") if f.is_file()) / rows
    sizes["total"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / rows
    return sizes


def rows_store(tokens: TokenStore, out: Path, parts: dict[str, tuple[str, int, int]]) -> TokenStore:
    """A classification token store whose splits are row ranges of `tokens`' splits:
    parts = {"train": (split, start, stop), "validation": (split, start, stop)}."""
    blocks = {name: tokens.blocks(split)[start:stop] for name, (split, start, stop) in parts.items()}
    columns = {name: {column: tokens.column(split, column)[start:stop] for column in tokens.task.columns}
               for name, (split, start, stop) in parts.items()}
    counts = {name: np.bincount(columns[name]["labels"], minlength=len(tokens.label_names)).tolist() for name in parts}
    return write_token_store(out, tokens, blocks, {"source": str(tokens.path), "parts": parts}, columns,
                             task="classification", label_names=tokens.label_names, label_counts=counts,
                             pad_id=tokens.meta["pad_id"])


def heldout_metrics(work: Path, tokens: TokenStore, start: int, rows: int, names) -> dict:
    """Metrics of the models under `work` on training rows [start, start + rows) of the full token store:
    chunks no model trained on, from the same files as the training rows (unlike the validation split,
    which holds other files)."""
    store = rows_store(tokens, work / "tokens_heldout", {"train": ("train", 0, 1), "validation": ("train", start, start + rows)})
    result = run_evaluate(EvaluateConfig(batch_size=64, latency_rounds=1), str(store.path),
                          {name: str(work / name) for name in names}, str(work / "metrics_heldout.json"))
    return result["models"]


def spread(values) -> str:
    return f"{np.mean(values):.4f} ± {np.ptp(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def print_kd_vs_ce(metrics: dict, tags, seeds) -> None:
    """Per student kind: each way's mean ± spread over seeds, KD/CE of the means, and at how many seeds KD won."""
    for kind in ("bert", "lstm"):
        mean = {}
        for way in ("kd", "ce"):
            runs_of = [metrics[f"{way}_{kind}{tag}"] for tag in tags]
            mean[way] = {key: float(np.mean([m[key] for m in runs_of])) for key in ("accuracy", "macro_f1")}
            print(f"{way}_{kind} over seeds {list(seeds)}: " + ", ".join(
                f"{key} {spread([m[key] for m in runs_of])}" for key in ("accuracy", "macro_f1", "ece", "top1_agreement")))
        wins = {key: sum(metrics[f"kd_{kind}{t}"][key] > metrics[f"ce_{kind}{t}"][key] for t in tags)
                for key in ("accuracy", "macro_f1")}
        print(f"{kind}: KD/CE accuracy {mean['kd']['accuracy'] / max(mean['ce']['accuracy'], 1e-9):.3f}, "
              f"macro-F1 {mean['kd']['macro_f1'] / max(mean['ce']['macro_f1'], 1e-9):.3f} (seed means); KD > CE at "
              f"{wins['accuracy']}/{len(tags)} seeds on accuracy, {wins['macro_f1']}/{len(tags)} on macro-F1")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/cls-bench")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--teacher-shape", type=int, nargs=3, default=(4, 128, 4), metavar=("L", "D", "H"))
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--teacher-model", default="", help="pretrained model directory or hub id to fine-tune "
                        "as the teacher (its tokenizer prepares the tokens); empty: the default BERT")
    parser.add_argument("--teacher-batch", type=int, default=32)
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--teacher-seed", type=int, default=0, help="the teacher's seed (initialisation, data order)")
    parser.add_argument("--train-rows", type=int, default=0, help="keep the first N training rows (0: all)")
    parser.add_argument("--heldout-rows", type=int, default=0, help="with --train-rows: also evaluate on this many "
                        "training rows after the kept ones (held-out chunks of the training files)")
    parser.add_argument("--seeds", type=int, nargs="+", default=(0,), help="student seeds (each student per seed)")
    parser.add_argument("--mlm-steps", type=int, default=600, help="teacher masked-LM pre-training steps")
    parser.add_argument("--student-shape", type=int, nargs=3, default=(2, 64, 2), metavar=("L", "D", "H"))
    parser.add_argument("--lstm-shape", type=int, nargs=2, default=(1, 64), metavar=("L", "D"))
    parser.add_argument("--steps", type=int, default=300, help="student steps (all students)")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--temperatures", type=float, nargs="*", default=(1.0, 2.0, 4.0))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    tokens = prepare_tokens(PrepareConfig(task="classification", vocab_size=args.vocab_size, tokenizer=args.teacher_model,
                                          block_size=args.block_size, val_fraction=0.1), work / "tokens")
    full = tokens
    if args.train_rows:
        tokens = rows_store(full, work / "tokens_subset", {"train": ("train", 0, args.train_rows),
                                                          "validation": ("validation", 0, full.num_rows("validation"))})
    L, D, H = args.teacher_shape
    teacher = dict(max_steps=args.teacher_steps, batch_size=args.teacher_batch, lr=args.teacher_lr, seed=args.teacher_seed)
    if args.teacher_model:  # a pretrained model: fine-tuned with a new head, no masked-LM pre-training
        teacher.update(model=args.teacher_model, finetune=True, warmup_steps=max(1, args.teacher_steps // 10))
    else:
        teacher.update(n_layer=L, n_embd=D, n_head=H, mlm_steps=args.mlm_steps, warmup_steps=50)
    materialise_teacher(TeacherConfig(**teacher), str(tokens.path), str(work / "teacher"))
    store = run_capture(CacheConfig(batch_size=64), str(work / "teacher"), str(tokens.path), str(work / "targets.zarr"))

    L, D, H = args.student_shape
    common = dict(max_steps=args.steps, batch_size=32, lr=2e-3, warmup_steps=30)
    bert = dict(n_layer=L, n_embd=D, n_head=H, **common)
    lstm = dict(arch="lstm", n_layer=args.lstm_shape[0], n_embd=args.lstm_shape[1], n_head=1, **common)
    runs = {}
    for seed in args.seeds:  # the first seed's students keep the plain names
        tag = "" if seed == args.seeds[0] else f"_s{seed}"
        runs.update({f"kd_bert{tag}": StudentConfig(alpha=args.alpha, seed=seed, **bert),
                     f"ce_bert{tag}": StudentConfig(alpha=1.0, seed=seed, **bert),
                     f"kd_lstm{tag}": StudentConfig(alpha=args.alpha, seed=seed, **lstm),
                     f"ce_lstm{tag}": StudentConfig(alpha=1.0, seed=seed, **lstm)})
    for tau in args.temperatures:
        if tau != 1.0:  # tau 1 is kd_bert (the capture temperature)
            runs[f"kd_bert_tau{tau:g}"] = StudentConfig(alpha=args.alpha, temperature=tau, **bert)
    for name, config in runs.items():
        run_student(config, str(tokens.path), str(work / name), None if config.alpha == 1.0 else [str(store.path)])

    models = {"teacher": str(work / "teacher"), **{name: str(work / name) for name in runs}}
    result = run_evaluate(EvaluateConfig(batch_size=64, latency_rounds=20), str(tokens.path), models,
                          str(work / "metrics.json"))
    metrics = result["models"]
    print(f"\n{result['validation_examples']} validation examples, {len(tokens.label_names)} labels, "
          f"{tokens.num_rows('train')} training rows, students {args.steps} steps, seeds {list(args.seeds)}\n")
    print(f"{'model':>14} {'accuracy':>9} {'macro_f1':>9} {'ece':>7} {'agree':>7} {'params':>9} "
          f"{'disk_bytes':>11} {'ms/example':>11}")
    for name, m in metrics.items():
        print(f"{name:>14} {m['accuracy']:9.4f} {m['macro_f1']:9.4f} {m['ece']:7.4f} {m['top1_agreement']:7.4f} "
              f"{m['params']:9,} {m['disk_bytes']:11,} {m['latency_ms_per_example']:11.3f}")
    print()
    tags = ["" if seed == args.seeds[0] else f"_s{seed}" for seed in args.seeds]
    print_kd_vs_ce(metrics, tags, args.seeds)
    teacher_ms = metrics["teacher"]["latency_ms_per_example"]
    print(f"latency teacher / kd_lstm: {teacher_ms / metrics['kd_lstm']['latency_ms_per_example']:.2f}x, "
          f"teacher / kd_bert: {teacher_ms / metrics['kd_bert']['latency_ms_per_example']:.2f}x")
    per_row = store_bytes_per_row(Path(store.path), store.rows)
    print("store bytes per row: " + ", ".join(f"{k} {v:.1f}" for k, v in per_row.items()))
    if args.heldout_rows:
        print(f"\non {args.heldout_rows} held-out training rows (after the first {args.train_rows}):")
        heldout = heldout_metrics(work, full, args.train_rows, args.heldout_rows, models)
        for name, m in heldout.items():
            print(f"{name:>14} accuracy {m['accuracy']:.4f} macro_f1 {m['macro_f1']:.4f} agree {m['top1_agreement']:.4f}")
        print_kd_vs_ce(heldout, tags, args.seeds)
    (work / "summary.json").write_text(json.dumps({"metrics": metrics, "store_bytes_per_row": per_row}, indent=2))


if __name__ == "__main__":
    main()
