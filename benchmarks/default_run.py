"""What the default run's capture costs and what it buys, from its outputs (run `make run` first).

  python benchmarks/default_run.py [--targets data/targets.zarr] [--metrics metrics.json]

Prints bytes per token of each array in the targets store next to fp16 full logits (2 x vocab
bytes per token), and the evaluate stage's validation loss of the teacher, KD and CE students.
"""

import argparse
import json

from pipeline.targets.reader import TargetsStore
from pipeline.targets.stats import summarize


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="data/targets.zarr")
    parser.add_argument("--metrics", default="metrics.json")
    args = parser.parse_args()

    summary = summarize(TargetsStore(args.targets))
    full = summary["fp16_full_logits_bytes_per_token"]
    print(f"targets store: {summary['rows']} rows, {summary['tokens']:,} tokens, top-{summary['top_k']} "
          f"{summary['encoding']}, vocab {summary['vocab_size']}, layers {summary['layers']}")
    print(f"{'array':>20}  bytes/token  share of fp16 full logits ({full} B/token)")
    for name, bpt in summary["arrays"].items():
        print(f"{name:>20}  {bpt:11.2f}  {bpt / full:8.4f}")
    print(f"{'total':>20}  {summary['bytes_per_token']:11.2f}  {summary['bytes_per_token'] / full:8.4f}"
          f"   ({full / summary['bytes_per_token']:.1f}x smaller)")
    print(f"tail mass kept out of top-{summary['top_k']}: mean {summary['tail_mass_mean']:.4f}, "
          f"median {summary['tail_mass_percentiles']['50']:.4f}")

    models = json.load(open(args.metrics))["models"]
    print(f"\n{'model':>12}  val_loss  perplexity  top1_vs_teacher  params")
    for name, m in models.items():
        print(f"{name:>12}  {m['val_loss']:8.4f}  {m['perplexity']:10.2f}  {m.get('top1_agreement', float('nan')):15.4f}"
              f"  {m['params']:,}")
    if {"student", "student_ce"} <= set(models):
        gap = models["student_ce"]["val_loss"] - models["student"]["val_loss"]
        print(f"KD student val_loss is {gap:+.4f} below the CE student's ({'better' if gap > 0 else 'NOT better'})")


if __name__ == "__main__":
    main()
