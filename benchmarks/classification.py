"""Classification distillation on the embedded default task (which stdlib package a chunk comes from).

One run: prepare --task classification → the default BERT teacher (--mlm-steps of masked-LM
pre-training on the train split's text, then --teacher-steps on the labels) → one capture (every class, P = 1)
→ students at equal steps, all from that one store:

  kd_bert / ce_bert   a small BERT classifier with KD (alpha --alpha) / on hard labels only
  kd_lstm / ce_lstm   a BiLSTM classifier (--arch lstm), the same two ways
  kd_bert_tau{t}      the KD BERT at training temperatures t (no recapture: the store holds every class)

Printed side by side: accuracy, macro-F1, ECE, agreement with the teacher, parameters, bytes on disk,
CPU latency per example (one example, batch 1, models timed in interleaved rounds; the machine may be
shared), the KD/CE ratios per student kind, the teacher/BiLSTM latency ratio, and the store's bytes
per row by array. Everything is written under --work (re-running reuses nothing: a fresh run).

  python benchmarks/classification.py --work /tmp/cls-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from pipeline.config import CacheConfig, EvaluateConfig, PrepareConfig, StudentConfig, TeacherConfig
from pipeline.data.tokens import prepare_tokens
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/cls-bench")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--teacher-shape", type=int, nargs=3, default=(4, 128, 4), metavar=("L", "D", "H"))
    parser.add_argument("--teacher-steps", type=int, default=600)
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

    tokens = prepare_tokens(PrepareConfig(task="classification", vocab_size=args.vocab_size,
                                          block_size=args.block_size, val_fraction=0.1), work / "tokens")
    L, D, H = args.teacher_shape
    materialise_teacher(TeacherConfig(n_layer=L, n_embd=D, n_head=H, max_steps=args.teacher_steps, batch_size=32,
                                      lr=1e-3, warmup_steps=50, mlm_steps=args.mlm_steps), str(tokens.path), str(work / "teacher"))
    store = run_capture(CacheConfig(batch_size=64), str(work / "teacher"), str(tokens.path), str(work / "targets.zarr"))

    L, D, H = args.student_shape
    common = dict(max_steps=args.steps, batch_size=32, lr=2e-3, warmup_steps=30)
    bert = dict(n_layer=L, n_embd=D, n_head=H, **common)
    lstm = dict(arch="lstm", n_layer=args.lstm_shape[0], n_embd=args.lstm_shape[1], n_head=1, **common)
    runs = {"kd_bert": StudentConfig(alpha=args.alpha, **bert), "ce_bert": StudentConfig(alpha=1.0, **bert),
            "kd_lstm": StudentConfig(alpha=args.alpha, **lstm), "ce_lstm": StudentConfig(alpha=1.0, **lstm)}
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
          f"{tokens.num_rows('train')} training rows, students {args.steps} steps\n")
    print(f"{'model':>14} {'accuracy':>9} {'macro_f1':>9} {'ece':>7} {'agree':>7} {'params':>9} "
          f"{'disk_bytes':>11} {'ms/example':>11}")
    for name, m in metrics.items():
        print(f"{name:>14} {m['accuracy']:9.4f} {m['macro_f1']:9.4f} {m['ece']:7.4f} {m['top1_agreement']:7.4f} "
              f"{m['params']:9,} {m['disk_bytes']:11,} {m['latency_ms_per_example']:11.3f}")
    print()
    for kind in ("bert", "lstm"):
        kd, ce = metrics[f"kd_{kind}"], metrics[f"ce_{kind}"]
        print(f"{kind}: KD/CE accuracy {kd['accuracy'] / max(ce['accuracy'], 1e-9):.3f}, "
              f"macro-F1 {kd['macro_f1'] / max(ce['macro_f1'], 1e-9):.3f}")
    teacher_ms = metrics["teacher"]["latency_ms_per_example"]
    print(f"latency teacher / kd_lstm: {teacher_ms / metrics['kd_lstm']['latency_ms_per_example']:.2f}x, "
          f"teacher / kd_bert: {teacher_ms / metrics['kd_bert']['latency_ms_per_example']:.2f}x")
    per_row = store_bytes_per_row(Path(store.path), store.rows)
    print("store bytes per row: " + ", ".join(f"{k} {v:.1f}" for k, v in per_row.items()))
    (work / "summary.json").write_text(json.dumps({"metrics": metrics, "store_bytes_per_row": per_row}, indent=2))


if __name__ == "__main__":
    main()
