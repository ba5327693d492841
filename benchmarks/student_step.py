"""The student step's own compute per mode, with no reading beside it: forward, backward and AdamW
on the same few real batches, modes interleaved step by step in one process, thread CPU per step.

`student_speed.py` times whole runs, which also carry the loader (reading and decoding shards in a
thread, or a worker process, on the machine's other core); this separates what the loss terms cost
the training thread from what reading costs around it. Batches come from the real loader, objectives
from `make_objective` with the student's own plan (`attention_plan`), as `kdcache student` builds them.

  python benchmarks/student_step.py --tokens data/tokens --targets data/targets.zarr \
      --modes ce,cache_topk,cache_tinybert,cache_minilm --rounds 60

Prints per mode the median and the 25th percentile of thread CPU ms per step (the lower quartile is
steadier on a shared machine), each as throughput relative to the first mode.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import yaml

from pipeline.config import StudentConfig
from pipeline.data.tokens import TokenStore
from pipeline.student.offline import attention_names, attention_plan, signal_names
from pipeline.student.setup import build_student, make_objective
from pipeline.targets.reader import TargetsStore
from pipeline.training.loader import BlockStream, make_loader
from student_speed import parse_with_allocator

MODES = {"ce": {"alpha": 1.0}, "cache_topk": {},
         "cache_tinybert": {"gamma": 1.0, "attention_loss": "tinybert"},
         "cache_minilm": {"gamma": 1.0, "attention_loss": "minilm"}}
BATCHES = 4  # distinct real batches per mode, cycled


def setup(config: StudentConfig, tokens_dir: str, store: TargetsStore):
    """(model, objective, batches, optimizer) of one mode, built as the student stage builds them."""
    tokens = TokenStore(tokens_dir)
    model = build_student(config, tokens, seed=config.seed)
    model.train()
    distill = config.alpha < 1.0
    attention = attention_plan(config, [store], model) if config.gamma else {}
    objective = make_objective(config, tokens, distill, store.capture_temperature, kd_signal="topk", **attention)
    names = (signal_names(store, "topk") if distill else []) + (attention_names(store, attention) if attention else [])
    stream = BlockStream(tokens_dir, "train", [store.path] if names else None, [names] if names else None,
                         shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    batches = iter(make_loader(stream, config.batch_size, 0))
    return model, objective, [next(batches) for _ in range(BATCHES)], torch.optim.AdamW(model.parameters(), lr=config.lr)


def step(model, objective, batch, optimizer) -> None:
    objective(model, batch)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--targets", required=True, help="a store with top-k (and attention) targets")
    parser.add_argument("--params", default="params.yaml", help="its `student` section sets the student")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--rounds", type=int, default=60, help="steps per mode (the first 5 are not counted)")
    args = parse_with_allocator(parser)
    with open(args.params) as f:
        base = StudentConfig(**yaml.safe_load(f)["student"])
    store = TargetsStore(args.targets)
    names = args.modes.split(",")
    built = {name: setup(replace(base, **MODES[name]), args.tokens, store) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            model, objective, batches, optimizer = built[name]
            start = time.thread_time()
            step(model, objective, batches[r % BATCHES], optimizer)
            times[name].append(time.thread_time() - start)
    counted = {name: sorted(t[5:]) for name, t in times.items()}  # the first steps warm caches up
    median = {name: statistics.median(t) for name, t in counted.items()}
    quartile = {name: t[len(t) // 4] for name, t in counted.items()}
    first = names[0]
    print(f"thread CPU per step over {args.rounds - 5} steps per mode, throughput relative to {first}:")
    for name in names:
        print(f"{name:>16}: median {median[name] * 1e3:6.1f} ms ({median[first] / median[name]:.3f})   "
              f"p25 {quartile[name] * 1e3:6.1f} ms ({quartile[first] / quartile[name]:.3f})")


if __name__ == "__main__":
    main()
