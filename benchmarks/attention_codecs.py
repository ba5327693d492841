"""What the compressor costs a student's reader: a store's attention arrays recompressed with other
Blosc compressors, bytes per token on disk against the time to read them back.

The writer compresses every array with Blosc zstd level 5 (format.compressor_for). The student's
loader reads its targets in a thread beside the training step, on the same cores, so reading time is
taken from the step; this prices the alternative. Rows are read back as the loader reads them (whole
chunks, zarr held to one decoding thread as `run_student` holds it), best of --repeats.

  python benchmarks/attention_codecs.py --targets data/targets.zarr --rows 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import zarr
from zarr.codecs import BloscCodec

from pipeline import runtime

COMPRESSORS = (("zstd", 5), ("zstd", 1), ("lz4hc", 5), ("lz4", 5))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", required=True, help="a store captured with --attention-layer")
    parser.add_argument("--rows", type=int, default=512, help="rows of each array, from the first")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    store = zarr.open_group(args.targets, mode="r")
    names = sorted(n for n, _ in store.arrays() if n.startswith(("attention_layer_", "value_relation_layer_")))
    if not names:
        raise SystemExit(f"{args.targets} holds no attention arrays: capture with `cache --attention-layer L`")
    data = {n: store[n][: args.rows] for n in names}
    tokens = args.rows * int(data[names[0]].shape[-2])
    runtime.decode_in_one_thread()
    print(f"{len(names)} arrays ({', '.join(names)}), {args.rows} rows; raw "
          f"{sum(d.nbytes for d in data.values()) / tokens:.0f} B/token")
    with tempfile.TemporaryDirectory() as tmp:
        for cname, clevel in COMPRESSORS:
            folder, stored = Path(tmp) / f"{cname}{clevel}", 0
            for n in names:
                shuffle = store[n].compressors[0].shuffle  # the writer's choice per dtype, kept
                copy = zarr.create_array(store=str(folder / n), shape=data[n].shape, dtype=data[n].dtype,
                                         chunks=store[n].chunks,
                                         compressors=BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle))
                copy[:] = data[n]
                stored += copy.nbytes_stored()
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                for n in names:
                    zarr.open_array(str(folder / n), mode="r")[:]
                best = min(best, time.perf_counter() - start)
            print(f"blosc {cname:<5} level {clevel}: {stored / tokens:7.1f} B/token  "
                  f"{1000 * best / args.rows * 16:5.2f} ms per 16 rows")


if __name__ == "__main__":
    main()
