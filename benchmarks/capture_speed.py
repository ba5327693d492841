"""Capture speed: the capture's wall time over the teacher's bare forward on the same batches.

Times, on the train split (or its first --train-rows rows), alternating round by round (medians printed):
  forward     load the teacher, read the rows and run its forward over them, batch by batch
              (torch.inference_mode, the capture's batch size): the least any capture can cost;
  background  `run_capture` (the `cache` stage) with the background writer: top-k, sampling,
              encoding, compression and writing of batch i overlap the forward of batch i + 1;
  inline      `run_capture` with --no-background-writer: all of it on one thread.
Each capture writes a fresh store in a temporary directory.

  python benchmarks/capture_speed.py --teacher models/teacher --tokens data/tokens --train-rows 512 \
      --samples 12 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from student_table import subset

from pipeline.config import CacheConfig
from pipeline.data.tokens import TokenStore
from pipeline.teacher.capture import run_capture
from pipeline.teacher.load import load_teacher


def bare_forward(config: CacheConfig, teacher_dir: str, tokens_dir: str) -> None:
    tokens = TokenStore(tokens_dir)
    model, _ = load_teacher(teacher_dir)
    model.eval()
    rows = tokens.num_rows(config.split)
    with torch.inference_mode():
        for lo in range(0, rows, config.batch_size):
            batch = tokens.rows(config.split, lo, min(lo + config.batch_size, rows))
            model(**tokens.task.model_inputs(batch))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--train-rows", type=int, default=0,
                        help="capture the first N train rows only (a token store and teacher copy under --work)")
    parser.add_argument("--work", default="/tmp/capture-speed")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    config = CacheConfig(top_k=args.top_k, samples=args.samples, batch_size=args.batch_size, device="cpu",
                         rows_per_shard=args.rows_per_shard, rows_per_chunk=min(32, args.rows_per_shard))
    tokens, teacher = subset(args) if args.train_rows else (args.tokens, args.teacher)
    with tempfile.TemporaryDirectory() as work:
        modes = {
            "forward": lambda out: bare_forward(config, teacher, tokens),
            "background": lambda out: run_capture(config, teacher, tokens, out),
            "inline": lambda out: run_capture(replace(config, background_writer=False), teacher, tokens, out),
        }
        seconds = {name: [] for name in modes}
        cpu = {name: [] for name in modes}  # CPU seconds of every thread of this process
        run_capture(config, teacher, tokens, str(Path(work) / "warm.zarr"))  # untimed: imports, caches
        for round_index in range(args.rounds):
            for name, run in modes.items():
                out = str(Path(work) / f"{name}-{round_index}.zarr")
                start, cpu_start = time.perf_counter(), time.process_time()
                run(out)
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
                print(f"round {round_index}: {name:>10} {seconds[name][-1]:7.2f} s  cpu {cpu[name][-1]:7.2f} s",
                      flush=True)
        count = TokenStore(tokens).num_rows("train") * TokenStore(tokens).block_size

    forward = statistics.median(seconds["forward"])
    print(f"\nmedians over {args.rounds} rounds, {count} tokens, batch {args.batch_size}, top-{args.top_k}, "
          f"{args.samples} samples, {torch.get_num_threads()} torch threads:")
    for name, values in seconds.items():
        median = statistics.median(values)
        paired = statistics.median(v / f for v, f in zip(values, seconds["forward"]))  # runs back to back
        cpu_ratio = statistics.median(cpu[name]) / statistics.median(cpu["forward"])
        print(f"  {name:>10}: {median:7.2f} s  {count / median:9,.0f} tok/s  / forward {median / forward:5.3f}  "
              f"per round {paired:5.3f}  CPU s / forward's {cpu_ratio:5.3f}")


if __name__ == "__main__":
    main()
