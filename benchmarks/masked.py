"""Masked LM, the DistilBERT recipe: what the initialisation from teacher layers and the KD terms each bring.

One run of params.masked.yaml's profile (prepare → the default BERT teacher → one capture at the masked
positions + the teacher's last layer), then four students of the same shape (the `student` section),
equal steps, one data order, all from that one store:

  kd_init      --init-from-teacher (every other layer) + MLM CE + KD + cosine   (DistilBERT)
  mlm_init     --init-from-teacher, MLM CE only (alpha 1, no cosine)            (the initialisation alone)
  kd_random    random init + MLM CE + KD + cosine                               (the KD terms alone)
  ce_random    random init, MLM CE only                                          (the profile's CE student)

Scored on the validation split's masked positions (masked-token loss, accuracy of the original id,
top-1 agreement with the teacher, ECE), and the store's bytes per row by array.

  OMP_NUM_THREADS=1 python benchmarks/masked.py --work /tmp/masked-bench
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules
from classification import spread  # noqa: E402
from generated_data import section, timed  # noqa: E402

from pipeline.config import CacheConfig, EvaluateConfig, PrepareConfig, StudentConfig, TeacherConfig  # noqa: E402
from pipeline.data.tokens import TokenStore, prepare_tokens  # noqa: E402
from pipeline.evaluate import run_evaluate  # noqa: E402
from pipeline.student import run_student  # noqa: E402
from pipeline.targets.reader import TargetsStore  # noqa: E402
from pipeline.targets.stats import summarize  # noqa: E402
from pipeline.teacher.capture import run_capture  # noqa: E402
from pipeline.training.teacher import materialise_teacher  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.masked.yaml")
    parser.add_argument("--work", default="/tmp/masked-bench")
    parser.add_argument("--steps", type=int, default=0, help="student steps (0: the profile's)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[],
                        help="student seeds (default: the profile's); each extra seed trains the four students "
                             "again as NAME_sS, and the means over seeds are printed")
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    tokens_dir, teacher_dir, targets_dir = work / "tokens", work / "teacher", work / "targets.zarr"
    if not (tokens_dir / "meta.json").exists():
        timed("prepare", lambda: prepare_tokens(section(PrepareConfig, params["prepare"]), tokens_dir))
    if not (teacher_dir / "kdcache.json").exists():
        timed("teacher", lambda: materialise_teacher(section(TeacherConfig, params["teacher"], eval_every=0),
                                                     str(tokens_dir), str(teacher_dir)))
    timed("cache", lambda: run_capture(section(CacheConfig, params["cache"]), str(teacher_dir), str(tokens_dir),
                                       str(targets_dir)))
    student = section(StudentConfig, params["student"], eval_every=0,
                      **({"max_steps": args.steps} if args.steps else {}))
    kinds = {"kd_init": student,
             "mlm_init": replace(student, alpha=1.0, cosine=0.0),
             "kd_random": replace(student, init_from_teacher=""),
             "ce_random": replace(student, alpha=1.0, cosine=0.0, init_from_teacher="")}
    seeds = args.seeds or [student.seed]
    tags = ["" if seed == seeds[0] else f"_s{seed}" for seed in seeds]  # as benchmarks/classification.py names them
    runs = {f"{name}{tag}": replace(config, seed=seed) for seed, tag in zip(seeds, tags) for name, config in kinds.items()}
    for name, config in runs.items():
        if not (work / name / "kdcache.json").exists():
            distils = config.alpha < 1.0 or config.cosine > 0
            timed(name, lambda: run_student(config, str(tokens_dir), str(work / name),
                                            [str(targets_dir)] if distils else None, teacher_dir=str(teacher_dir)))
    models = {"teacher": str(teacher_dir), **{name: str(work / name) for name in runs}}
    result = run_evaluate(EvaluateConfig(batch_size=64, latency_rounds=1), str(tokens_dir), models,
                          str(work / "metrics.json"))
    metrics = result["models"]
    tokens = TokenStore(tokens_dir)
    print(f"\n{tokens.num_rows('validation')} validation blocks x {result['mask_count']} masked positions; "
          f"{tokens.num_rows('train')} training rows; students {student.n_layer}x{student.n_embd}, "
          f"{student.max_steps} steps, batch {student.batch_size}, alpha {student.alpha}, tau {student.temperature}, "
          f"cosine {student.cosine}\n")
    print(f"{'model':>10} {'masked loss':>11} {'accuracy':>9} {'agreement':>9} {'ECE':>7} {'params':>10}")
    for name, m in metrics.items():
        print(f"{name:>10} {m['val_loss']:11.4f} {m['accuracy']:9.4f} {m['top1_agreement']:9.4f} {m['ece']:7.4f} "
              f"{m['params']:10,}")
    if len(seeds) > 1:
        print(f"\nmean ± spread (max − min) over seeds {seeds}:")
        for kind in kinds:
            print(f"  {kind:>10} " + ", ".join(f"{key} {spread([metrics[kind + tag][key] for tag in tags])}"
                                              for key in ("val_loss", "accuracy", "top1_agreement")))
    summary = summarize(TargetsStore(targets_dir))
    block = tokens.block_size
    per_row = {name: bpt * block for name, bpt in summary["arrays"].items()}
    print(f"\nstore: {summary['rows']} rows, {summary['bytes_per_token'] * block:.1f} bytes per row ("
          + ", ".join(f"{k} {v:.1f}" for k, v in per_row.items()) + f"); top-{summary['top_k']} at "
          f"{result['mask_count']} masked positions + layers {summary['layers']} at all {block}")
    (work / "summary.json").write_text(json.dumps({"metrics": metrics, "bytes_per_row": per_row}, indent=2))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
