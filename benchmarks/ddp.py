"""DDP (torchrun, 2 CPU ranks over gloo) vs one process at the same global batch: the loss curves.

Trains the `student` of --params five times through the real CLI: one process; two ranks under
torchrun; and one-process yardsticks that change only the data order, as DDP does:
"buffer-1", a shuffle buffer one row smaller (same shards at the same steps, other rows share a
step), and "2 workers", two loader workers (the shards dealt to two streams exactly as to two ranks,
a batch from each in turn). "buffer x4", a 4x larger shuffle buffer, shows what better-mixed batches
alone do: a 2-rank step takes its rows from two streams, so its batches are mixed more than one
stream's. Same init and global batch everywhere. Prints the mean training loss per
window of steps side by side and each run's mean relative gap to the one-process curve. Wall times
are printed too (the ranks share the machine's cores).

  PYTHONPATH=$PWD python benchmarks/ddp.py --tokens data/tokens --targets data/targets.zarr \
      --steps 300 --window 50
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
    section.setdefault("shuffle_buffer", 256)
    return [item for key, value in section.items() if not isinstance(value, list)
            for item in (f"--{key.replace('_', '-')}", str(value))]


def train(name: str, args: list[str], work: Path, nproc: int = 1) -> tuple[list[float], float]:
    log = work / f"{name}.csv"
    cmd = [KDCACHE, *args, "--out", str(work / name), "--log", str(log)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.runtime.run", "--standalone", f"--nproc-per-node={nproc}", "--", *cmd]
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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50)
    args = parser.parse_args()
    common = ["student", "--tokens", args.tokens, "--targets", args.targets, *student_args(args.params, args.steps)]
    with tempfile.TemporaryDirectory(prefix="kdcache-ddp-") as tmp:
        work = Path(tmp)
        buffer = int(common[common.index("--shuffle-buffer") + 1])
        runs = {"1 process": train("one", common, work),
                "2 ranks": train("two", common, work, nproc=2),
                "buffer-1": train("buffer", [*common, "--shuffle-buffer", str(buffer - 1)], work),
                "2 workers": train("workers", [*common, "--num-workers", "2"], work),
                "buffer x4": train("buffer4", [*common, "--shuffle-buffer", str(4 * buffer)], work)}
    print(f"global batch {common[common.index('--batch-size') + 1]}, {args.steps} steps; wall: "
          + ", ".join(f"{name} {seconds:.0f} s" for name, (_, seconds) in runs.items()))
    curves = {name: curve for name, (curve, _) in runs.items()}
    base = curves["1 process"]
    print(f"{'steps':>11} " + " ".join(f"{name:>10}" for name in curves) + "   (ratios to 1 process)")
    gaps = {name: [] for name in curves}
    for lo in range(0, args.steps, args.window):
        hi = min(lo + args.window, args.steps)
        means = {name: sum(c[lo:hi]) / (hi - lo) for name, c in curves.items()}
        for name, m in means.items():
            gaps[name].append(abs(m / means["1 process"] - 1))
        print(f"{lo + 1:>5}-{hi:<5} " + " ".join(f"{m:>10.4f}" for m in means.values()) + "   "
              + " ".join(f"{means[n] / means['1 process']:.3f}" for n in list(curves)[1:]))
    print("mean |relative gap| per window to 1 process: "
          + ", ".join(f"{name} {100 * sum(g) / len(g):.2f}%" for name, g in gaps.items() if name != "1 process"))
    last = slice(-max(1, args.steps // 3), None)
    print("mean loss, last third of the steps: "
          + ", ".join(f"{name} {sum(c[last]) / len(c[last]):.4f}" for name, c in curves.items()))


if __name__ == "__main__":
    main()
