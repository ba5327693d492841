"""What the student's loader holds while it streams a store: the decoded shards' tensors, in bytes.

The shuffle buffer yields a shard's last rows long after its first, so several shards are open at
once. The loader cuts each older shard down to its rows still due once the reader has moved on
(`loader.HeldShard.compact_in`); `whole` holds every open shard whole, as the loader did before.
Both stream the same rows of the same store in one process, one after the other, and report the
bytes held at each row: median and peak, and their ratio.

  python benchmarks/loader_memory.py --tokens G/tokens --targets W/targets.zarr --signals topk attention
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

from pipeline import runtime
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore
from pipeline.training import loader
from pipeline.training.loader import BlockStream


def held_bytes(compact: bool, args, names: list[str]) -> tuple[list[int], float]:
    """Bytes held by the open shards at each row of the stream, and the seconds it took."""
    alive, held = weakref.WeakSet(), []

    class Counted(loader.HeldShard):
        def __init__(self, *shard):
            super().__init__(*shard)
            alive.add(self)

        def compact_in(self, reader):
            if compact:
                super().compact_in(reader)

        def take(self, row):
            held.append(sum(t.nbytes for shard in alive for t in shard.tensors.values()))
            return super().take(row)

    original, loader.HeldShard = loader.HeldShard, Counted
    try:
        stream = BlockStream(args.tokens, "train", args.targets, names, shuffle_buffer=args.shuffle_buffer,
                             seed=args.seed)
        start = time.perf_counter()
        for n, _ in enumerate(stream):
            if n + 1 >= args.rows:
                break
        return held, time.perf_counter() - start
    finally:
        loader.HeldShard = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--signals", nargs="+", default=["topk", "attention"],
                        help="what to read: topk, attention (every captured matrix), hidden")
    parser.add_argument("--rows", type=int, default=4096, help="rows streamed per setting")
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="the student's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runtime.decode_in_one_thread()
    store = TargetsStore(args.targets)
    names = [name for signal in args.signals for name in fmt.signal_names(store.attrs, signal)]
    print(f"{args.targets}: {store.attrs['rows_per_shard']} rows per shard, reading {len(names)} arrays "
          f"({', '.join(args.signals)}), {args.rows} rows, shuffle buffer {args.shuffle_buffer}")
    results = {setting: held_bytes(setting == "compacted", args, names) for setting in ("whole", "compacted")}
    mib = 1 << 20
    for setting, (held, seconds) in results.items():
        print(f"  {setting:>9}: median {statistics.median(held) / mib:8.1f} MiB   peak {max(held) / mib:8.1f} MiB   "
              f"({seconds:.1f} s)")
    (whole, _), (compacted, _) = results["whole"], results["compacted"]
    print(f"  compacted / whole: median {statistics.median(compacted) / statistics.median(whole):.3f}   "
          f"peak {max(compacted) / max(whole):.3f}")


if __name__ == "__main__":
    main()
