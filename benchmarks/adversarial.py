"""Adversarial distillation vs plain KD at equal steps: validation loss, ECE, top-1 agreement.

Trains the same student (same seed, data order and steps) from one top-k targets store twice: plain
offline KD, and KD + the adversarial term (`--adversarial`); then evaluates both with the teacher as
reference (`run_evaluate` on the validation split) and prints them side by side with the ratio
adversarial ÷ KD, plus the discriminator's mean accuracy over the first and last tenth of the steps.

  python benchmarks/adversarial.py --tokens data/tokens --teacher models/teacher --targets data/targets.zarr \
      --steps 200 --seeds 0 1
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np

from pipeline.config import EvaluateConfig, StudentConfig
from pipeline.evaluate import run_evaluate
from pipeline.student import run_student
from pipeline.training.loop import TrainFiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--weight", type=float, default=0.1)
    parser.add_argument("--student-shape", type=int, nargs=3, default=[1, 32, 2], metavar=("LAYERS", "WIDTH", "HEADS"))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--eval-batches", type=int, default=8)
    args = parser.parse_args()
    metrics = {"KD": [], "KD + adversarial": []}
    accuracy = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            common = dict(max_steps=args.steps, batch_size=args.batch_size, n_layer=args.student_shape[0],
                          n_embd=args.student_shape[1], n_head=args.student_shape[2], seed=seed, device="cpu")
            runs = {"KD": StudentConfig(**common),
                    "KD + adversarial": StudentConfig(**common, adversarial=True, adversarial_weight=args.weight)}
            dirs = {"teacher": args.teacher}
            for name, config in runs.items():
                out = Path(tmp) / f"{seed}-{name.replace(' ', '').replace('+', '_')}"
                run_student(config, args.tokens, str(out / "model"), args.targets, TrainFiles(log=str(out / "log.csv")))
                dirs[name] = str(out / "model")
                if config.adversarial:
                    with open(out / "log.csv") as f:
                        acc = [float(r["disc_acc"]) for r in csv.DictReader(f)]
                    tenth = max(1, len(acc) // 10)
                    accuracy.append((np.mean(acc[:tenth]), np.mean(acc[-tenth:])))
            result = run_evaluate(EvaluateConfig(max_batches=args.eval_batches, latency_rounds=1), args.tokens, dirs,
                                  str(Path(tmp) / f"metrics-{seed}.json"))["models"]
            for name in runs:
                metrics[name].append(result[name])
    print(f"{len(args.seeds)} seed(s), {args.steps} steps, batch {args.batch_size}, adversarial weight {args.weight}")
    print(f"{'metric':<16} {'KD':>9} {'KD + adv':>9} {'ratio':>7}")
    for key in ("val_loss", "ece", "top1_agreement"):
        kd = np.mean([m[key] for m in metrics["KD"]])
        adv = np.mean([m[key] for m in metrics["KD + adversarial"]])
        print(f"{key:<16} {kd:>9.4f} {adv:>9.4f} {adv / kd:>7.3f}")
    first, last = np.mean([a for a, _ in accuracy]), np.mean([b for _, b in accuracy])
    print(f"discriminator accuracy: first tenth of steps {first:.3f}, last tenth {last:.3f}")


if __name__ == "__main__":
    main()
