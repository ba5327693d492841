"""Student training speed: cached KD vs hard labels only vs the teacher in the loop (online KD).

Runs the real `student` code path (`pipeline.student.run_student`) for each mode, alternating modes
round by round so machine noise hits all of them alike, and prints ratios of medians.

  python benchmarks/student_speed.py --tokens data/tokens --targets data/targets.zarr \
      --teacher models/teacher --steps 100 --rounds 3          # step throughput, per mode
  python benchmarks/student_speed.py ... --epoch --rounds 1     # one full epoch offline vs online
  python benchmarks/student_speed.py ... --preread              # diagnostic: shards served from memory

Modes: ce (hard labels only), cache_topk, cache_topk_hidden (beta = 1, when the store has layers),
cache_sampled (when it has sampled targets; with --unfused also cache_sampled_unfused, the same
through the reference losses instead of the fused one), cache_tinybert and cache_minilm (gamma = 1,
when the store has attention targets), online_topk (teacher in the loop), and teacher_forward:
the teacher's forward alone over the same batches, which gives the ideal online / offline ratio
(teacher forward + student step) / student step that the measured one is compared with.
Student settings come from the `student` section of --params (the default run's student).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
import yaml

from pipeline import losses
from pipeline.config import StudentConfig
from pipeline.training.loader import BlockStream, make_loader
from pipeline.targets.reader import TargetsStore
from pipeline.student.online import OnlineTargets
from pipeline.data.tokens import TokenStore
from pipeline.student import run_student
from pipeline import runtime
from pipeline.runtime import resolve_device


def modes(args, store: TargetsStore, vocab: int) -> dict:
    """name -> (config overrides, run_student keyword arguments)."""
    found = {
        "ce": ({"alpha": 1.0}, {"targets": None}),
        "cache_topk": ({}, {"targets": args.targets}),
    }
    if store.layers:
        found["cache_topk_hidden"] = ({"beta": 1.0}, {"targets": args.targets})
    if store.samples:
        found["cache_sampled"] = ({"kd_signal": "sampled"}, {"targets": args.targets})
        if args.unfused:
            found["cache_sampled_unfused"] = ({"kd_signal": "sampled"}, {"targets": args.targets, "unfused": True})
    if store.attrs.get("attention_layers"):  # attention distillation (TinyBERT per head, MiniLM)
        for kind in ("tinybert", "minilm"):
            found[f"cache_{kind}"] = ({"gamma": 1.0, "attention_loss": kind}, {"targets": args.targets})
    for extra in args.also:  # NAME=STORE: top-k KD from another store, e.g. another encoding
        name, path = extra.split("=", 1)
        found[f"cache_{name}"] = ({"kd_signal": "topk"}, {"targets": path})
    if args.teacher:
        online = OnlineTargets(args.teacher, vocab, store.top_k, store.capture_temperature, [], resolve_device("cpu"))
        found["online_topk"] = ({}, {"targets": None, "add_targets": online})
        found["teacher_forward"] = ({}, {"teacher_only": online})
    return found


@contextmanager
def preread_shards(enabled: bool):
    """Serve every shard from memory once read (diagnostic): the run's time without the reader's work,
    after an untimed first pass of each mode has filled it. Off: the real reader, reading each time."""
    if not enabled:
        yield
        return
    read, kept = BlockStream.read_shard, {}

    def from_memory(self, tokens, stores, shard):
        key = (tuple(self.targets_paths), repr(self.target_names), self.split, shard)
        if key not in kept:
            kept[key] = read(self, tokens, stores, shard)
        return kept[key]

    BlockStream.read_shard = from_memory
    try:
        yield
    finally:
        BlockStream.read_shard = read


@contextmanager
def unfused_sampled_kd():
    """Sampled KD through the reference losses (cross_entropy + sampled_kd, autograd) instead of the fused one."""
    fused = losses.ce_and_sampled_kd
    losses.ce_and_sampled_kd = lambda logits, labels, ce_mask, ids, counts, tau: (
        losses.cross_entropy(logits, labels, ce_mask), losses.sampled_kd(logits, ids, counts, tau))
    try:
        yield
    finally:
        losses.ce_and_sampled_kd = fused


def teacher_forward(config: StudentConfig, tokens: str, online: OnlineTargets) -> None:
    """The teacher's share of an online step: its forward over the batches the student would see."""
    stream = BlockStream(tokens, "train", shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    loader = make_loader(stream, config.batch_size, config.num_workers)
    steps = config.max_steps or config.epochs * math.ceil(stream.num_rows / config.batch_size)
    with torch.inference_mode():
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            online(batch)


def parse_with_allocator(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """parser's arguments plus --default-malloc; without it, the allocator set as `kdcache` sets it."""
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator at its defaults (the kdcache command keeps large freed "
                             "blocks for reuse, runtime.keep_freed_memory; by default this benchmark does too)")
    args = parser.parse_args()
    if not args.default_malloc:
        runtime.keep_freed_memory()
    return args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--targets", default="data/targets.zarr")
    parser.add_argument("--teacher", default="models/teacher", help="for the online-KD mode ('' to skip)")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=STORE",
                        help="another store to train from (mode cache_NAME), e.g. sqd=/tmp/sqd.zarr")
    parser.add_argument("--unfused", action="store_true",
                        help="also time sampled KD through the unfused reference losses (mode cache_sampled_unfused)")
    parser.add_argument("--modes", default="", help="comma-separated subset of the modes (default: all)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=100, help="steps per measured run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=0,
                        help="loader workers decoding shards beside the training process (every mode)")
    parser.add_argument("--epoch", action="store_true", help="time one full epoch instead of --steps")
    parser.add_argument("--preread", action="store_true",
                        help="diagnostic: read and decode each shard once, untimed, and serve it from memory, "
                             "so the times leave out the loader's reading")
    args = parse_with_allocator(parser)

    section = yaml.safe_load(open(args.params))["student"]
    # Steps only: no periodic validation, and the one-off checksum pass over the store (timed below)
    # stays out of the per-mode times, as it is a fixed cost that a real run spreads over all its steps.
    base = replace(StudentConfig(**section), eval_every=0, verify=False, num_workers=args.num_workers)
    base = replace(base, max_steps=0, epochs=1) if args.epoch else replace(base, max_steps=args.steps, epochs=0)
    tokens, store = TokenStore(args.tokens), TargetsStore(args.targets)
    runs = modes(args, store, tokens.vocab_size)
    if args.modes:
        runs = {name: run for name, run in runs.items() if name in args.modes.split(",")}
    start = time.perf_counter()
    store.check_shards(store.topk_names())
    print(f"verifying the top-k arrays of {args.targets} before training: {time.perf_counter() - start:.2f} s")
    seconds = {name: [] for name in runs}
    cpu = {name: [] for name in runs}  # this process's CPU seconds: less sensitive to other tenants
    with tempfile.TemporaryDirectory() as out:  # untimed: the first run in a process pays the imports
        run_student(replace(base, alpha=1.0, max_steps=2, epochs=0), args.tokens, out)
    def run_mode(name: str) -> None:
        overrides, kwargs = runs[name]
        config = replace(base, **overrides)
        with tempfile.TemporaryDirectory() as out:
            if "teacher_only" in kwargs:
                teacher_forward(config, args.tokens, kwargs["teacher_only"])
            else:
                with unfused_sampled_kd() if "unfused" in kwargs else nullcontext():
                    run_student(config, args.tokens, out, **{k: v for k, v in kwargs.items() if k != "unfused"})

    with preread_shards(args.preread):
        if args.preread:  # untimed: one pass of every mode fills the memory
            for name in runs:
                run_mode(name)
        for round_index in range(args.rounds):
            for name in runs:
                start, cpu_start = time.perf_counter(), time.process_time()
                run_mode(name)
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
                print(f"round {round_index}: {name:>18} {seconds[name][-1]:7.2f} s  cpu {cpu[name][-1]:7.2f} s", flush=True)

    unit = "1 epoch" if args.epoch else f"{args.steps} steps"
    print(f"\nmedian wall time for {unit} (batch {base.batch_size} x {tokens.block_size} tokens), "
          f"ratio = CE time / mode time (throughput relative to hard labels):")
    ce = statistics.median(seconds["ce"])
    for name, values in seconds.items():
        median = statistics.median(values)
        # Also: the median of the per-round ratios (pairs run back to back), and the same in CPU seconds.
        paired = statistics.median(c / v for c, v in zip(seconds["ce"], values))
        cpu_ratio = statistics.median(cpu["ce"]) / statistics.median(cpu[name])
        print(f"  {name:>18}: {median:7.2f} s   throughput vs CE {ce / median:5.3f}   per round {paired:5.3f}   "
              f"in CPU s {cpu_ratio:5.3f}")
    if "online_topk" in seconds:
        online = statistics.median(seconds["online_topk"])
        offline = statistics.median(seconds["cache_topk"])
        print(f"  offline / online wall time: {offline / online:5.3f}  (online is {online / offline:4.2f}x slower)")
        ideal = (statistics.median(seconds["teacher_forward"]) + offline) / offline
        print(f"  ideal online / offline (teacher forward + student step) / student step: {ideal:4.2f}; "
              f"measured {online / offline:4.2f} = {online / offline / ideal:5.3f} of ideal")


if __name__ == "__main__":
    main()
