"""Low-rank hidden states (`cache --hidden-rank P`) against full-width float16, side by side.

Captures the teacher's hidden states of --layer layers over the VALIDATION split with the real
`pipeline.capture.run_capture`, once at full width and once per rank P, and prints per P:

  bytes/tok     stored bytes per token of the hidden arrays of all layers (compressed, on disk), the
                bases and means included (amortised over the split's tokens)
  x full        full-width bytes / these bytes
  kept          fraction of hidden-state variance kept over the whole split (`hidden_variance_kept`),
                per layer; `fit` the same on the fit rows (`hidden_variance_kept_fit`)

  python benchmarks/hidden_rank.py --tokens data/tokens --teacher models/teacher --layer 2 --layer 4
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig
from pipeline.targets import format as fmt
from pipeline.targets.stats import stored_bytes


def hidden_bytes_per_token(store) -> float:
    names = [fmt.hidden_array(l) for l in store.layers] + list(store.attrs.get("unsharded", {}))
    return sum(stored_bytes(store, name) for name in names) / (store.rows * int(store.attrs["block_size"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--layer", type=int, action="append", help="teacher layer (repeat); default 2 and 4")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--fit-rows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = tuple(args.layer or (2, 4))

    base = CacheConfig(top_k=1, layers=layers, split="validation", hidden_fit_rows=args.fit_rows)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="hidden-rank-") as work:
        for rank in [0, *args.ranks]:
            config = replace(base, hidden_rank=rank)
            store = run_capture(config, args.teacher, args.tokens, str(Path(work) / f"rank{rank}.zarr"))
            rows[rank] = (hidden_bytes_per_token(store), store.attrs.get("hidden_variance_kept", {}),
                          store.attrs.get("hidden_variance_kept_fit", {}))
            D = int(store.attrs["hidden_size"])
        tokens = store.rows * int(store.attrs["block_size"])

    print(f"\nhidden states of layers {list(layers)} (D = {D}), validation split, {tokens:,} tokens; "
          f"basis fitted on the first {args.fit_rows} rows")
    header = "  ".join(f"{'kept L' + str(l):>9} {'fit':>6}" for l in layers)
    print(f"{'rank':>6} {'bytes/tok':>10} {'x full':>7}  {header}")
    full = rows[0][0]
    for rank, (bpt, kept, fit) in rows.items():
        cells = "  ".join(f"{kept.get(str(l), 1.0):9.4f} {fit.get(str(l), 1.0):6.4f}" for l in layers)
        print(f"{rank or D:>5}{' ' if rank else '*'} {bpt:10.1f} {full / bpt:7.2f}  {cells}")
    print("* full width, float16 (no basis)")


if __name__ == "__main__":
    main()
