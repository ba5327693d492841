"""What the attention terms cost one block, forward + backward, against the fused SDPA the student
runs in every other block: the floor under a distilled student's step.

At one block's shapes (the default student's by default: B 16, H 4, T 128, d 16; teacher rows in
the topk encoding with K 32, made by the real codecs from random attention), interleaved, the
median thread time of:
  sdpa       torch's fused causal attention (what a block costs with no attention term)
  tinybert   models.distilling_attention's kernel with the TinyBERT loss (the block and its loss)
  minilm     the same kernel with MiniLM's attention KL
  relation   MiniLM's value-relation KL alone (losses.relation_kl on R = H relation heads)
A MiniLM student pays minilm + relation where a CE student pays sdpa; a TinyBERT student pays
tinybert in place of sdpa in each distilled block. --spans times the three kernels at each width of
their query spans (losses.attention.QUERY_SPAN; default: the library's).

  python benchmarks/attention_kernels.py [--batch 16 --heads 4 --block 128 --head-dim 16 --top-k 32] --rounds 200 \
      [--spans 16,32,64]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from pipeline import losses
from pipeline.losses import attention
from pipeline.losses.attention import DistilledAttention
from pipeline.targets import codecs
from student_speed import parse_with_allocator


def sparse_teacher(batch: int, heads: int, block: int, top_k: int, generator) -> losses.SparseRows:
    """Random causal attention rows through the topk encoding and the loader's decode."""
    scores = torch.randn(batch, heads, block, block, generator=generator) * 3
    rows = torch.softmax(scores.masked_fill(torch.ones(block, block).triu(1).bool(), -math.inf), -1)
    stored = codecs.encode_attention(rows, "topk", top_k)
    return losses.SparseRows.of(*codecs.sparse_attention(stored[codecs.KEYS], stored[codecs.PROBS]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=200, help="calls of each (the first 10 are not counted)")
    parser.add_argument("--spans", default=str(attention.QUERY_SPAN),
                        help="comma-separated query-span widths to time the kernels at")
    args = parse_with_allocator(parser)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    B, H, T, d = args.batch, args.heads, args.block, args.head_dim
    teacher = sparse_teacher(B, H, T, args.top_k, generator)
    mass = teacher.mass()
    q, k, v = (torch.randn(B, H, T, d, generator=generator, requires_grad=True) for _ in range(3))
    values = torch.randn(B, T, H * d, generator=generator, requires_grad=True)
    d_out = torch.randn(B, H, T, d, generator=generator)
    scale = 1 / math.sqrt(d)

    def sdpa():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(d_out)

    def kernel(kind, span):
        attention.QUERY_SPAN = span
        out, loss = DistilledAttention.apply(q, k, v, scale, kind, teacher.keys, teacher.above, teacher.fill,
                                             teacher.entropy, mass)
        torch.autograd.backward([out, loss], [d_out, torch.ones(())])

    def relation(span):
        attention.QUERY_SPAN = span
        losses.relation_kl(values, teacher).backward()

    spans = [int(s) for s in args.spans.split(",")]
    runs = {"sdpa": sdpa}
    for span in spans:
        tag = "" if len(spans) == 1 else f"@{span}"
        runs |= {f"tinybert{tag}": lambda span=span: kernel("tinybert", span),
                 f"minilm{tag}": lambda span=span: kernel("minilm", span),
                 f"relation{tag}": lambda span=span: relation(span)}
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.thread_time()
            run()
            times[name].append(time.thread_time() - start)
            for x in (q, k, v, values):
                x.grad = None
    median = {name: statistics.median(t[10:]) for name, t in times.items()}
    print(f"one block, forward + backward (B {B}, H {H}, T {T}, d {d}, K {args.top_k}), median thread time "
          f"of {args.rounds - 10} calls:")
    for name in runs:
        print(f"  {name:>12}: {median[name] * 1e3:6.2f} ms  ({median[name] / median['sdpa']:4.2f} x sdpa)")
    for span in spans:
        tag = "" if len(spans) == 1 else f"@{span}"
        print(f"  spans of {span} queries: a TinyBERT block over an SDPA block "
              f"{(median['tinybert' + tag] - median['sdpa']) * 1e3:+.2f} ms; MiniLM's block and value relations "
              f"over an SDPA block {(median['minilm' + tag] + median['relation' + tag] - median['sdpa']) * 1e3:+.2f} ms")


if __name__ == "__main__":
    main()
