"""DDP (torchrun, 2 CPU ranks over gloo) vs one process at the same global batch: the loss curves.

Trains the `student` of --params three times through the real CLI: one process; two ranks under
torchrun; and, as the yardstick, one process whose shuffle buffer differs (same init, same rows per
epoch, other blocks sharing a step: the only thing DDP changes too). Prints the mean training loss
per window of steps side by side, and the mean relative gap of DDP and of the yardstick to the
one-process curve. Wall times are printed too (2 ranks share the machine's cores with each other).

  PYTHONPATH=$PWD python benchmarks/ddp.py --tokens data/tokens --targets data/targets.zarr \
      --steps 200 --window 20
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

KDCACHE = str(Path(sys.executable).parent / "kdcache")


def student_args(params: str, steps: int) -> list[str]:
    section = yaml.safe_load(Path(params).read_text())["student"]
    section.update(max_steps=steps, device="cpu", eval_every=0)
    return [item for key, value in section.items() if not isinstance(value, list)
            for item in (f"--{key.replace('_', '-')}", str(value))]


def train(name: str, args: list[str], work: Path, nproc: int = 1) -> tuple[list[float], float]:
    log = work / f"{name}.csv"
    cmd = [KDCACHE, *args, "--out", str(work / name), "--log", str(log)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process, whatever the count
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with log.open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args()
    common = ["student", "--tokens", args.tokens, "--targets", args.targets, *student_args(args.params, args.steps)]
    with tempfile.TemporaryDirectory(prefix="kdcache-ddp-") as tmp:
        work = Path(tmp)
        one, t_one = train("one", common, work)
        two, t_two = train("two", common, work, nproc=2)
        other, t_other = train("other_order", [*common, "--shuffle-buffer", "64"], work)
    print(f"global batch {common[common.index('--batch-size') + 1]}, {args.steps} steps; wall: 1 process "
          f"{t_one:.0f} s, 2 ranks {t_two:.0f} s, 1 process other order {t_other:.0f} s")
    print(f"{'steps':>11} {'1 process':>10} {'2 ranks':>10} {'2r/1p':>7} {'other order':>12} {'oo/1p':>7}")
    gaps_two, gaps_other = [], []
    for lo in range(0, args.steps, args.window):
        hi = min(lo + args.window, args.steps)
        a, b, c = (sum(x[lo:hi]) / (hi - lo) for x in (one, two, other))
        gaps_two.append(abs(b / a - 1))
        gaps_other.append(abs(c / a - 1))
        print(f"{lo + 1:>5}-{hi:<5} {a:>10.4f} {b:>10.4f} {b / a:>7.3f} {c:>12.4f} {c / a:>7.3f}")
    print(f"mean |relative gap| per window: 2 ranks {100 * sum(gaps_two) / len(gaps_two):.2f}%, "
          f"other order {100 * sum(gaps_other) / len(gaps_other):.2f}%")


if __name__ == "__main__":
    main()
