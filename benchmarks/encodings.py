"""Encodings of cached top-k log-probs, side by side: bytes, fidelity and speed on real teacher outputs.

Runs the teacher over the VALIDATION split (first --max-rows rows) and, for each encoding of
`pipeline.targets.encode.ENCODINGS`, prints one row:

  bytes/tok    stored bytes per token of the top-k values (`topk_logprobs` plus the encoding's
               parameter array), compressed as the real writer does: a temporary targets store
               written by `pipeline.targets.writer.TargetsWriter`, sizes summed on disk
  KL           mean KL(teacher's full distribution ‖ reconstruction), nats; the reconstruction puts
               the decoded top-k probabilities on their ids and spreads the (true, float32) tail mass
               uniformly over the other V − K ids, then is normalised to sum to 1. Most of it is the
               top-k truncation itself: dKL (the excess over fp32's) is what the encoding costs
  max|err|     largest |decoded − true| top-k log-prob
  top-1        fraction of positions whose reconstruction has the teacher's top-1 id as its unique
               most probable id (an encoding that ties the top two entries loses it)
  tail         mean 1 − Σ decoded top-k probabilities (the true mean tail mass is printed above)
  enc, dec     encode (float32 tensor → stored arrays) and decode (`decode_rows` on the stored arrays →
               float32 tensor) throughput, tokens/s, best of --repeats

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

from pipeline.targets import encode
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore, decode_rows
from pipeline.targets.stats import stored_bytes
from pipeline.targets.writer import TargetsWriter
from pipeline.teacher import load_teacher, teacher_targets
from pipeline.tokens import TokenStore
from pipeline.train import resolve_device


def batches(rows: int, batch_size: int):
    return [(lo, min(lo + batch_size, rows)) for lo in range(0, rows, batch_size)]


def stored_topk_bytes(name: str, logprobs: np.ndarray, rows_per_chunk: int, rows_per_shard: int) -> int:
    """Bytes on disk of the top-k arrays of `name`, written by the real writer into a temporary store."""
    R, T, K = logprobs.shape
    identity = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "tokens_fingerprint": "bench",
                "teacher_fingerprint": "bench", "split": "validation", "rows": R, "block_size": T,
                "vocab_size": 0, "temperature": 1.0, "top_k": K, "encoding": name, "ids_dtype": "uint16",
                "layers": [], "hidden_size": 0, "hidden_dtype": "float16", "rows_per_chunk": rows_per_chunk,
                "rows_per_shard": rows_per_shard, "teacher_num_layers": 0}
    arrays = encode.encode_topk_logprobs(torch.from_numpy(logprobs), name)
    with tempfile.TemporaryDirectory() as tmp:
        writer = TargetsWriter(Path(tmp) / "t.zarr", identity, encode.topk_arrays(name, T, K))
        for index in writer.pending():
            start, stop = writer.ranges[index]
            writer.write_shard(index, {n: a[start:stop] for n, a in arrays.items()})
        writer.finish()
        store = TargetsStore(writer.path)
        read_back = store.read_rows(0, R, encode.topk_names(name))
        assert all(np.array_equal(read_back[n], a) for n, a in arrays.items()), f"{name}: store round trip"
        return sum(stored_bytes(store, n) for n in encode.topk_names(name))


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def kl_to_reconstruction(full: torch.Tensor, ids: torch.Tensor, decoded: torch.Tensor,
                         tail: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position. full (N, V) teacher log-probs; ids, decoded (N, K); tail (N,) log-mass."""
    V, K = full.shape[-1], ids.shape[-1]
    if K < V:
        log_q = (tail - np.log(V - K)).unsqueeze(-1).expand_as(full).clone()
        log_norm = torch.logaddexp(torch.logsumexp(decoded, -1), tail)
    else:
        log_q = torch.full_like(full, float("-inf"))
        log_norm = torch.logsumexp(decoded, -1)
    log_q.scatter_(-1, ids, decoded)
    log_q -= log_norm.unsqueeze(-1)
    p = full.exp()
    return torch.where(p > 0, p * (full - log_q), torch.zeros_like(p)).sum(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--max-rows", type=int, default=256, help="validation rows to use (from the first)")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows-per-chunk", type=int, default=32, help="as `kdcache cache` (CacheConfig)")
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--encodings", nargs="*", default=list(encode.ENCODINGS))
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is kept)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    for name in args.encodings:
        encode.check_encoding(name)

    tokens = TokenStore(args.tokens)
    V, T = tokens.vocab_size, tokens.block_size
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
            targets = teacher_targets(model, input_ids, V, args.top_k, args.temperature)
            full = torch.log_softmax(model(input_ids=input_ids).logits[..., :V].float() / args.temperature, -1)
        return {n: t.cpu() for n, t in targets.items()}, full.cpu()

    parts = [forward(lo, hi)[0] for lo, hi in spans]
    true = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
    logprobs = true[fmt.TOPK_LOGPROBS].numpy()
    n_tok = rows * T

    results = {}
    for name in args.encodings:
        encoded = encode.encode_topk_logprobs(true[fmt.TOPK_LOGPROBS], name)
        enc_s = best_time(lambda: encode.encode_topk_logprobs(true[fmt.TOPK_LOGPROBS], name), args.repeats)
        dec_s = best_time(lambda: decode_rows(encoded), args.repeats)
        decoded = decode_rows(encoded)[fmt.TOPK_LOGPROBS]
        nbytes = stored_topk_bytes(name, logprobs, args.rows_per_chunk, args.rows_per_shard)
        results[name] = {"bytes": nbytes / n_tok, "enc": n_tok / enc_s, "dec": n_tok / dec_s, "decoded": decoded,
                         "err": float((decoded - true[fmt.TOPK_LOGPROBS]).abs().max()),
                         "tail": float((1 - decoded.double().exp().sum(-1)).mean()), "kl": 0.0, "top1": 0}

    for b, (lo, hi) in enumerate(spans):  # second pass: the full distributions, one batch at a time
        _, full = forward(lo, hi)
        ids, tail = true[fmt.TOPK_IDS][lo:hi].flatten(0, 1), true[fmt.TAIL_LOGMASS][lo:hi].flatten(0, 1)
        full = full.flatten(0, 1)
        teacher_top1 = full.argmax(-1)
        for r in results.values():
            decoded = r["decoded"][lo:hi].flatten(0, 1)
            r["kl"] += float(kl_to_reconstruction(full, ids, decoded, tail).double().sum())
            other = decoded[:, 1] if decoded.shape[-1] > 1 else torch.full_like(decoded[:, 0], float("-inf"))
            if decoded.shape[-1] < V:
                other = torch.maximum(other, tail - np.log(V - decoded.shape[-1]))
            r["top1"] += int(((ids[:, 0] == teacher_top1) & (decoded[:, 0] > other)).sum())

    print(f"{rows} validation rows x {T} tokens = {n_tok:,} tokens; vocab {V}, top-{args.top_k}, "
          f"T={args.temperature}; true mean tail mass {float(true[fmt.TAIL_LOGMASS].double().exp().mean()):.4f}; "
          f"device {device}")
    reference = results.get("fp32", {}).get("kl")
    print(f"{'encoding':>8} {'bytes/tok':>9} {'KL':>10} {'dKL':>9} {'max|err|':>9} {'top-1':>7} {'tail':>7} "
          f"{'enc tok/s':>10} {'dec tok/s':>10}")
    for name, r in results.items():
        kl = r["kl"] / n_tok
        dkl = f"{kl - reference / n_tok:9.2e}" if reference is not None else f"{'-':>9}"
        print(f"{name:>8} {r['bytes']:9.2f} {kl:10.5f} {dkl} {r['err']:9.4f} {r['top1'] / n_tok:7.4f} "
              f"{r['tail']:7.4f} {r['enc']:10.3g} {r['dec']:10.3g}")


if __name__ == "__main__":
    main()
