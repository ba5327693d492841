"""Peak memory of one student training step with and without chunked losses (loss_chunk).

Each setting runs in a fresh child process (so one setting's allocations cannot hide another's) that
builds a GPT-2 student with a large vocabulary, a batch of synthetic top-k targets, and runs one
forward + backward + AdamW step through the real `pipeline.objective.Objective`. On CPU the peak is
the child's ru_maxrss; on CUDA, torch.cuda.max_memory_allocated. "step" is the peak minus what was
held just before the step (model, batch, targets), i.e. what the loss computation itself adds.

  python benchmarks/loss_memory.py                                   # V 32000, T 1024, B 4, top-32
  python benchmarks/loss_memory.py --vocab 50257 --chunks 0 256 1024 --loss tail_jsd
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(args) -> dict:
    import torch

    from pipeline.config import ModelShape
    from pipeline.training.objective import Objective
    from pipeline.models import build_gpt2
    from pipeline.targets import format as fmt

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.batch * args.block
    model = build_gpt2(ModelShape(n_layer=args.layers, n_embd=args.width, n_head=4), args.vocab, args.block).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    # Distinct top-k ids per position without an (N, V) tensor: an offset plus a stride coprime-ish to V.
    offsets = torch.randint(0, args.vocab, (n, 1), generator=g)
    ids = (offsets + torch.arange(args.top_k) * 997) % args.vocab
    probs = torch.rand(n, args.top_k, generator=g).sort(-1, descending=True).values
    probs = 0.9 * probs / probs.sum(-1, keepdim=True)  # the top-k hold 90%, the tail 10%
    shape = (args.batch, args.block)
    batch = {"input_ids": torch.randint(0, args.vocab, shape, generator=g), fmt.TOPK_IDS: ids.reshape(*shape, -1),
             fmt.TOPK_LOGPROBS: probs.log().reshape(*shape, -1),
             fmt.TAIL_LOGMASS: torch.full(shape, 0.1).log()}
    batch = {k: v.to(device) for k, v in batch.items()}
    objective = Objective(vocab_size=args.vocab, alpha=0.5, temperature=2.0, loss=args.loss,
                          loss_chunk=args.chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    start = time.perf_counter()
    parts = objective(model, batch)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"chunk": args.chunk, "before_mib": before, "peak_mib": peak, "seconds": time.perf_counter() - start,
            "loss": parts["loss"].item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--loss", default="tail_kl")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)  # set in the child
    args = parser.parse_args()
    if args.chunk is not None:
        print(json.dumps(child(args)))
        return
    n = args.batch * args.block
    print(f"one training step: V={args.vocab} T={args.block} B={args.batch} (N={n} positions), top-{args.top_k}, "
          f"loss {args.loss}, GPT-2 {args.layers}x{args.width}, {args.device}; full logits alone = "
          f"{n * args.vocab * 4 / 2**20:,.0f} MiB fp32")
    rows = []
    for chunk in args.chunks:
        argv = [a for a in sys.argv[1:]]
        out = subprocess.run([sys.executable, __file__, *argv, "--chunk", str(chunk)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{'loss_chunk':>10} {'peak MiB':>10} {'step MiB':>10} {'step/unchunked':>15} {'seconds':>8} {'loss':>10}")
    for row in rows:
        step = row["peak_mib"] - row["before_mib"]
        ratio = step / max(base["peak_mib"] - base["before_mib"], 1e-9)
        print(f"{row['chunk']:>10} {row['peak_mib']:>10,.0f} {step:>10,.0f} {ratio:>15.3f} {row['seconds']:>8.2f} "
              f"{row['loss']:>10.5f}")


if __name__ == "__main__":
    main()
