"""Student training speed: cached KD vs hard labels only vs the teacher in the loop (online KD).

Runs the real `student` code path (`pipeline.student.run_student`) for each mode, alternating modes
round by round so machine noise hits all of them alike, and prints ratios of medians.

  python benchmarks/student_speed.py --tokens data/tokens --targets data/targets.zarr \
      --teacher models/teacher --steps 100 --rounds 3          # step throughput, per mode
  python benchmarks/student_speed.py ... --epoch --rounds 1     # one full epoch offline vs online
  python benchmarks/student_speed.py ... --preread              # diagnostic: shards served from memory
  python benchmarks/student_speed.py ... --readers process,thread,preread   # the readers side by side

Modes: ce (hard labels only), cache_topk, cache_topk_hidden (beta = 1, when the store has layers),
cache_sampled (when it has sampled targets; with --unfused also cache_sampled_unfused, the same
through the reference losses instead of the fused one), cache_tinybert and cache_minilm (gamma = 1,
when the store has attention targets), online_topk (teacher in the loop), and teacher_forward:
the teacher's forward alone over the same batches, which gives the ideal online / offline ratio
(teacher forward + student step) / student step that the measured one is compared with.
Student settings come from the `student` section of --params (the default run's student).

Readers (--readers, each mode runs under each, alternating in every round): process (the student's
default, `reader: process`: a forked reader process hands batches over in shared memory), thread
(`reader: thread`: a thread of the training process reads and decodes one shard ahead), preread
(diagnostic: the thread reader with every shard served from memory once read: no reading at all),
workers (`num_workers: 1`: a DataLoader worker process, which pickles each batch into fresh shared
memory).
Besides whole-run times it prints, from step 20 on, the mean step time (the steady rate of a long
run: a whole short run also carries its start, e.g. the first shards read before the first step)
and the 25th percentile of the steps' own times (the gaps between batches: other tenants' bursts on
a shared machine move the means far more), and the seconds to the first batch.
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
from pipeline.training import loop
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


READERS = ("process", "thread", "preread", "workers")


@contextmanager
def reading(reader: str, kept: dict):
    """Inside, shards are served from memory once read if `reader` is preread (`kept` holds them);
    gives the student settings the runs take (preread reads in the training process, as thread)."""
    read = BlockStream.read_shard

    def from_memory(self, tokens, stores, shard):
        key = (tuple(self.targets_paths), repr(self.target_names), self.split, shard)
        if key not in kept:
            kept[key] = read(self, tokens, stores, shard)
        return kept[key]

    if reader == "preread":
        BlockStream.read_shard = from_memory
    try:
        yield {"process": {"reader": "process"}, "workers": {"num_workers": 1}}.get(reader, {"reader": "thread"})
    finally:
        BlockStream.read_shard = read


class Stamped:
    """A loader that appends to `stamps` the time each of its batches comes out."""

    def __init__(self, loader, stamps: list):
        self.loader, self.stamps = loader, stamps

    def __iter__(self):
        for batch in self.loader:
            self.stamps.append(time.perf_counter())
            yield batch


@contextmanager
def stamped(stamps: list):
    """Inside, the training loop's loaders (either reader) stamp their batches into `stamps`."""
    make, shared = loop.make_loader, loop.SharedBatches
    loop.make_loader = lambda *args, **kwargs: Stamped(make(*args, **kwargs), stamps)
    loop.SharedBatches = lambda *args, **kwargs: Stamped(shared(*args, **kwargs), stamps)
    try:
        yield
    finally:
        loop.make_loader, loop.SharedBatches = make, shared


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
    parser.add_argument("--readers", default="process",
                        help=f"comma-separated, of {', '.join(READERS)} (see above); every mode runs under each")
    parser.add_argument("--preread", action="store_true", help="the same as --readers preread")
    args = parse_with_allocator(parser)
    readers = ["preread"] if args.preread else args.readers.split(",")
    if unknown := set(readers) - set(READERS):
        parser.error(f"unknown readers {sorted(unknown)}; choose from {', '.join(READERS)}")

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
    timed = [(reader, name) for reader in readers for name in runs]
    seconds = {run: [] for run in timed}
    cpu = {run: [] for run in timed}  # this process's CPU seconds (not the reader process's): steadier
    steps = {run: [] for run in timed}  # each step's own time (the gaps between its batches), from step 20
    steady = {run: [] for run in timed}  # per run: the mean step time from step 20
    first = {run: [] for run in timed}  # per run: seconds to its first batch
    with tempfile.TemporaryDirectory() as out:  # untimed: the first run in a process pays the imports
        run_student(replace(base, alpha=1.0, max_steps=2, epochs=0), args.tokens, out)
    def run_mode(name: str, loader: dict) -> None:
        overrides, kwargs = runs[name]
        config = replace(base, **overrides, **loader)
        with tempfile.TemporaryDirectory() as out:
            if "teacher_only" in kwargs:
                teacher_forward(config, args.tokens, kwargs["teacher_only"])
            else:
                with unfused_sampled_kd() if "unfused" in kwargs else nullcontext():
                    run_student(config, args.tokens, out, **{k: v for k, v in kwargs.items() if k != "unfused"})

    kept: dict = {}
    if "preread" in readers:  # untimed: one pass of every mode fills the memory
        with reading("preread", kept) as setting:
            for name in runs:
                run_mode(name, setting)
    for round_index in range(args.rounds):
        for reader, name in timed:
            stamps: list[float] = []
            with reading(reader, kept) as setting, stamped(stamps):
                start, cpu_start = time.perf_counter(), time.process_time()
                run_mode(name, setting)
                seconds[reader, name].append(time.perf_counter() - start)
                cpu[reader, name].append(time.process_time() - cpu_start)
            gaps = [b - a for a, b in zip(stamps[20:], stamps[21:])]
            steps[reader, name] += gaps
            steady[reader, name].append(statistics.mean(gaps) if gaps else math.nan)
            first[reader, name].append(stamps[0] - start if stamps else math.nan)
            label = f"{name} ({reader})" if len(readers) > 1 else name
            print(f"round {round_index}: {label:>28} {seconds[reader, name][-1]:7.2f} s  "
                  f"cpu {cpu[reader, name][-1]:7.2f} s", flush=True)

    unit = "1 epoch" if args.epoch else f"{args.steps} steps"
    print(f"\nmedian wall time for {unit} (batch {base.batch_size} x {tokens.block_size} tokens), "
          f"ratio = CE time / mode time (throughput relative to hard labels), CE under the same reader:")
    for reader in readers:
        if len(readers) > 1:
            print(f" reader {reader}:")
        ce = statistics.median(seconds[reader, "ce"])
        ce_step, ce_steady = quartile(steps[reader, "ce"]), statistics.median(steady[reader, "ce"])
        for name in runs:
            values = seconds[reader, name]
            median = statistics.median(values)
            # Also: the median of the per-round ratios (pairs run back to back), the same in CPU seconds,
            # the steady rate from step 20 and the steps' lower quartile (least touched by other tenants).
            paired = statistics.median(c / v for c, v in zip(seconds[reader, "ce"], values))
            cpu_ratio = statistics.median(cpu[reader, "ce"]) / statistics.median(cpu[reader, name])
            step, mean = quartile(steps[reader, name]), statistics.median(steady[reader, name])
            print(f"  {name:>18}: {median:7.2f} s   throughput vs CE {ce / median:5.3f}   per round {paired:5.3f}   "
                  f"in CPU s {cpu_ratio:5.3f}   from step 20 {mean * 1e3:6.1f} ms ({ce_steady / mean:5.3f})   "
                  f"step p25 {step * 1e3:6.1f} ms ({ce_step / step:5.3f})   "
                  f"first batch {statistics.median(first[reader, name]):5.2f} s")
    if "online_topk" in runs:
        reader = readers[0]
        online = statistics.median(seconds[reader, "online_topk"])
        offline = statistics.median(seconds[reader, "cache_topk"])
        print(f"  offline / online wall time: {offline / online:5.3f}  (online is {online / offline:4.2f}x slower)")
        ideal = (statistics.median(seconds[reader, "teacher_forward"]) + offline) / offline
        print(f"  ideal online / offline (teacher forward + student step) / student step: {ideal:4.2f}; "
              f"measured {online / offline:4.2f} = {online / offline / ideal:5.3f} of ideal")


def quartile(values: list[float]) -> float:
    """The 25th percentile (nan when there are none: runs of 21 steps or fewer)."""
    return statistics.quantiles(values, n=4)[0] if len(values) > 1 else math.nan


if __name__ == "__main__":
    main()
