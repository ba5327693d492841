"""Encodings of cached top-k targets, side by side: bytes, fidelity and speed on real teacher outputs.

Runs the teacher over the VALIDATION split (first --max-rows rows) and, for each encoding of
`pipeline.targets.codecs.ENCODINGS`, prints one row:

  values       stored bytes per token of the top-k values (`topk_logprobs` plus the encoding's
               parameter array); sizes come from a temporary targets store written by
               `pipeline.targets.writer.TargetsWriter` (compressed as the real writer does), summed on disk
  top-k        stored bytes per token of the whole top-k target: ids + values + tail (+ counts)
  KL           mean KL(teacher's full distribution ‖ reconstruction), nats; the reconstruction puts
               the decoded top-k probabilities on their decoded ids and spreads the (true, float32) tail
               mass uniformly over the other ids, then is normalised to sum to 1. Most of it is the
               top-k truncation itself: dKL (the excess over fp32's) is what the encoding costs
  top-1        fraction of positions whose reconstruction has the teacher's top-1 id as its unique
               most probable id (an encoding that ties the top two entries loses it)
  tail         mean 1 − Σ decoded top-k probabilities (the true mean tail mass is printed above)
  enc, dec     encode (tensors → stored arrays, `encode_topk`) and decode (`decode_rows` on the stored
               arrays → tensors) throughput, tokens/s, best of --repeats

Then the issue's bar: the best encoding's top-k bytes against 1/3 of fp16 values + uint16 ids
(4·K bytes per token, uncompressed) and its dKL against 5% of fp32's KL; and its ratio to the
compressed fp16 + uint16 store; the decode speed of uint16 and bit-packed (18-bit) ids. Then top-p trimming (`--top-p`): mean kept entries, bytes and KL per p,
at --top-k as the maximum, in fp16 and in the best encoding.

  python benchmarks/encodings.py --tokens data/tokens --teacher models/teacher --max-rows 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from pipeline.targets import codecs
from pipeline.targets import ids as id_codec
from pipeline.targets import format as fmt
from pipeline.targets.format import decode_rows
from pipeline.targets.reader import TargetsStore
from pipeline.targets.stats import stored_bytes
from pipeline.targets.writer import TargetsWriter
from pipeline.teacher.load import load_teacher
from pipeline.teacher.signals import teacher_targets, trim_top_p
from pipeline.data.tokens import TokenStore
from pipeline.runtime import resolve_device


def batches(rows: int, batch_size: int):
    return [(lo, min(lo + batch_size, rows)) for lo in range(0, rows, batch_size)]


def stored_topk_bytes(name: str, stored: dict[str, np.ndarray], tail: np.ndarray, ids_dtype: str,
                      rows_per_chunk: int, rows_per_shard: int) -> dict[str, int]:
    """Bytes on disk per array of the top-k target (`stored` plus the tail), written by the real writer
    into a temporary store and read back (which must give the same arrays)."""
    R, T, K = stored[fmt.TOPK_LOGPROBS].shape
    trimmed = fmt.TOPK_COUNT in stored
    identity = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "tokens_fingerprint": "bench",
                "teacher_fingerprint": "bench", "split": "validation", "rows": R, "block_size": T,
                "vocab_size": 0, "capture_temperature": 1.0, "top_k": K, "top_p": 0.5 if trimmed else 1.0, "min_k": 1,
                "encoding": name, "ids_dtype": ids_dtype, "layers": [], "hidden_size": 0,
                "hidden_dtype": "float16", "rows_per_chunk": rows_per_chunk, "rows_per_shard": rows_per_shard,
                "teacher_num_layers": 0, "samples": 0, "seed": 0}
    arrays = {**stored, fmt.TAIL_LOGMASS: tail}
    specs = fmt.array_specs(identity)
    with tempfile.TemporaryDirectory() as tmp:
        writer = TargetsWriter(Path(tmp) / "t.zarr", identity, specs)
        for index in writer.pending():
            start, stop = writer.ranges[index]
            writer.write_shard(index, {n: a[start:stop] for n, a in arrays.items()})
        writer.finish()
        store = TargetsStore(writer.path)
        read_back = store.read_rows(0, R, list(arrays))
        assert all(np.array_equal(read_back[n], a) for n, a in arrays.items()), f"{name}: store round trip"
        return {n: stored_bytes(store, n) for n in arrays}


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def kl_to_reconstruction(full: torch.Tensor, ids: torch.Tensor, decoded: torch.Tensor,
                         tail: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position. full (N, V) teacher log-probs; ids, decoded (N, K), absent entries −inf
    (top-p padding); tail (N,) log-mass, spread uniformly over the V − (kept) other ids."""
    V = full.shape[-1]
    absent = torch.isneginf(decoded)
    kept = (~absent).sum(-1)
    # Absent slots point at the first id with its value, so scattering them changes nothing.
    ids, decoded = torch.where(absent, ids[:, :1], ids), torch.where(absent, decoded[:, :1], decoded)
    if bool((kept < V).all()):
        log_q = (tail - torch.log((V - kept).double()).float()).unsqueeze(-1).expand_as(full).clone()
        log_norm = torch.logaddexp(torch.logsumexp(decoded.masked_fill(absent, float("-inf")), -1), tail)
    else:
        log_q = torch.full_like(full, float("-inf"))
        log_norm = torch.logsumexp(decoded, -1)
    log_q.scatter_(-1, ids, decoded)
    log_q -= log_norm.unsqueeze(-1)
    p = full.exp()
    return torch.where(p > 0, p * (full - log_q), torch.zeros_like(p)).sum(-1)


def top1_hits(full: torch.Tensor, ids: torch.Tensor, decoded: torch.Tensor, tail: torch.Tensor) -> int:
    """Positions whose reconstruction has the teacher's top-1 id as its unique most probable id."""
    V, K = full.shape[-1], decoded.shape[-1]
    other = decoded[:, 1] if K > 1 else torch.full_like(decoded[:, 0], float("-inf"))
    kept = (~torch.isneginf(decoded)).sum(-1)
    other = torch.where(kept < V, torch.maximum(other, tail - torch.log((V - kept).clamp(min=1).float())), other)
    return int(((ids[:, 0] == full.argmax(-1)) & (decoded[:, 0] > other)).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--max-rows", type=int, default=256, help="validation rows to use (from the first)")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--top-p", type=float, nargs="*", default=[0.9, 0.95, 0.99],
                        help="top-p values for the trimming table (none: skip it)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows-per-chunk", type=int, default=32, help="as `kdcache cache` (CacheConfig)")
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--encodings", nargs="*", default=list(codecs.ENCODINGS))
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is kept)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    for name in args.encodings:
        codecs.check_encoding(name)

    tokens = TokenStore(args.tokens)
    V, T, K = tokens.vocab_size, tokens.block_size, args.top_k
    ids_dtype = id_codec.ids_dtype(V)
    rows = min(args.max_rows, tokens.num_rows("validation"))
    blocks = tokens.blocks("validation")[:rows]
    model, _ = load_teacher(args.teacher)
    device = resolve_device(args.device)
    model.to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    spans = batches(rows, args.batch_size)

    def forward(lo, hi):
        input_ids = torch.from_numpy(blocks[lo:hi].astype(np.int64)).to(device)
        with autocast, torch.inference_mode():
            targets = teacher_targets(model, input_ids, V, K, args.temperature)
            full = torch.log_softmax(model(input_ids=input_ids).logits[..., :V].float() / args.temperature, -1)
        return {n: t.cpu() for n, t in targets.items()}, full.cpu()

    parts = [forward(lo, hi)[0] for lo, hi in spans]
    true = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
    n_tok = rows * T

    def measure(name, top_p=1.0, timed=True):
        ids, logprobs, count = trim_top_p(true[fmt.TOPK_IDS], true[fmt.TOPK_LOGPROBS], top_p)
        kept = torch.logsumexp(logprobs, -1).clamp(max=0.0)
        tail = torch.log(-torch.expm1(kept)).masked_fill(count >= V, float("-inf"))
        count = count if top_p < 1.0 else None
        attrs = {"encoding": name, "ids_dtype": ids_dtype, "top_k": K}
        stored = fmt.encode_topk(ids, logprobs, name, ids_dtype, count)
        decoded = decode_rows(stored, attrs)
        sizes = stored_topk_bytes(name, stored, tail.numpy(), ids_dtype, args.rows_per_chunk, args.rows_per_shard)
        values = sum(b for n, b in sizes.items() if n.startswith(fmt.TOPK_LOGPROBS))
        r = {"values": values / n_tok, "total": sum(sizes.values()) / n_tok, "ids": decoded[fmt.TOPK_IDS],
             "decoded": decoded[fmt.TOPK_LOGPROBS], "tail_true": tail, "kl": 0.0, "top1": 0,
             "tail": float((1 - decoded[fmt.TOPK_LOGPROBS].double().exp().sum(-1)).mean()),
             "kept": float((K if count is None else count.double()).mean() if count is not None else K)}
        if timed:
            r["enc"] = n_tok / best_time(lambda: fmt.encode_topk(ids, logprobs, name, ids_dtype, count), args.repeats)
            r["dec"] = n_tok / best_time(lambda: decode_rows(stored, attrs), args.repeats)
        return r

    results = {name: measure(name) for name in args.encodings}
    best = min((n for n in results if n != "fp32"), key=lambda n: results[n]["total"], default=None)
    trimmed = {(p, name): measure(name, p, timed=False) for p in args.top_p
               for name in dict.fromkeys(n for n in ("fp16", best) if n in results)}

    for b, (lo, hi) in enumerate(spans):  # second pass: the full distributions, one batch at a time
        _, full = forward(lo, hi)
        full = full.flatten(0, 1)
        for r in [*results.values(), *trimmed.values()]:
            ids, decoded = r["ids"][lo:hi].flatten(0, 1), r["decoded"][lo:hi].flatten(0, 1)
            tail = r["tail_true"][lo:hi].flatten(0, 1)
            r["kl"] += float(kl_to_reconstruction(full, ids, decoded, tail).double().sum())
            r["top1"] += top1_hits(full, ids, decoded, tail)

    print(f"{rows} validation rows x {T} tokens = {n_tok:,} tokens; vocab {V} (ids {ids_dtype}), top-{K}, "
          f"T={args.temperature}; true mean tail mass {float(true[fmt.TAIL_LOGMASS].double().exp().mean()):.4f}; "
          f"device {device}")
    reference = results["fp32"]["kl"] / n_tok if "fp32" in results else None
    print(f"{'encoding':>8} {'values':>7} {'top-k':>7} {'KL':>9} {'dKL':>9} {'top-1':>7} {'tail':>7} "
          f"{'enc tok/s':>10} {'dec tok/s':>10}   (values, top-k: stored bytes/token)")
    for name, r in results.items():
        kl = r["kl"] / n_tok
        dkl = f"{kl - reference:9.2e}" if reference is not None else f"{'-':>9}"
        print(f"{name:>8} {r['values']:7.2f} {r['total']:7.2f} {kl:9.5f} {dkl} {r['top1'] / n_tok:7.4f} "
              f"{r['tail']:7.4f} {r['enc']:10.3g} {r['dec']:10.3g}")

    if best is not None and reference is not None:
        r = results[best]
        raw_bar, dkl = 4 * K / 3, r["kl"] / n_tok - reference
        print(f"bar, bytes: {best} top-k {r['total']:.2f} B/token vs 1/3 of fp16 values + uint16 ids "
              f"(4*{K}/3 = {raw_bar:.2f}): {'PASS' if r['total'] <= raw_bar else 'FAIL'} "
              f"(ratio {r['total'] / (4 * K):.3f})")
        print(f"bar, KL:    {best} dKL {dkl:.5f} vs 5% of fp32's KL ({0.05 * reference:.5f}): "
              f"{'PASS' if dkl <= 0.05 * reference else 'FAIL'} (KL {r['kl'] / n_tok:.5f} vs {reference:.5f}, "
              f"+{100 * dkl / reference:.2f}%)")
        if "fp16" in results:
            print(f"vs the compressed fp16 + uint16 store ({results['fp16']['total']:.2f} B/token): "
                  f"ratio {r['total'] / results['fp16']['total']:.3f}")
    # Bit-packed ids (vocabularies above 65 536) decode in the loader workers: the same ids, K per position.
    speeds = {}
    for layout in ("uint16", id_codec.ids_dtype(152_064)):
        packed = id_codec.encode_ids(true[fmt.TOPK_IDS], layout)
        speeds[layout] = n_tok / best_time(lambda: id_codec.decode_ids(packed, layout, K), args.repeats)
    print("ids decode, tokens/s: " + ", ".join(f"{layout} {speed:.3g}" for layout, speed in speeds.items()))
    if trimmed:
        print(f"top-p trimming (at most {K} kept, min_k 1):")
        print(f"{'p':>6} {'encoding':>8} {'kept':>6} {'top-k':>7} {'KL':>9} {'top-1':>7}   "
              f"(top-k: ids + values + counts + tail, bytes/token)")
        for (p, name), r in trimmed.items():
            print(f"{p:6.3f} {name:>8} {r['kept']:6.2f} {r['total']:7.2f} {r['kl'] / n_tok:9.5f} "
                  f"{r['top1'] / n_tok:7.4f}")


if __name__ == "__main__":
    main()
