"""Attention targets side by side: bytes and fidelity of each encoding; students with and without them.

  encodings   captures the VALIDATION split with every teacher block's attention (and value relations)
              once per encoding through the real `run_capture`, and prints per encoding:
              raw     bytes per token per layer before compression (attention + value relations)
              stored  the same on disk (zstd, as the writer compresses)
              KL      mean KL(teacher row ‖ decoded row) over rows, heads and queries, nats, attention
              KL(vr)  the same for the value relations
              max|e|  largest absolute error of a decoded probability
              The teacher's own rows come from `teacher_targets` in float32 on the same rows.
  students    captures the TRAIN split once (top-k, hidden states and attention of the chosen blocks),
              then trains the same student for --steps steps each: logits-only KD; + hidden (--beta,
              MSE and relative MSE); + TinyBERT attention (gamma); + MiniLM (gamma); and CE only
              (--only picks some). Prints the validation loss and training tokens/s of each, and
              tokens/s ÷ CE's.

  python benchmarks/attention.py encodings --tokens data/tokens --teacher models/teacher
  python benchmarks/attention.py students --tokens data/tokens --teacher models/teacher --steps 100
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import CacheConfig, StudentConfig
from pipeline.data.tokens import TokenStore
from pipeline.models import num_layers, use_eager_attention
from pipeline.student import run_student
from pipeline.targets import format as fmt
from pipeline.targets.stats import stored_bytes
from pipeline.teacher.capture import run_capture
from pipeline.teacher.load import load_teacher
from pipeline.teacher.signals import teacher_targets
from pipeline.training.loop import TrainFiles


def row_kl(true: torch.Tensor, decoded: torch.Tensor) -> float:
    """Mean over (R, H, T) of KL(true row ‖ decoded row)."""
    ratio = torch.log(true.clamp(min=1e-30)) - torch.log(decoded.clamp(min=1e-30))
    return float(torch.where(true > 0, true * ratio, torch.zeros_like(true)).sum(-1).mean())


def encodings(args) -> None:
    tokens = TokenStore(args.tokens)
    model, _ = load_teacher(args.teacher)
    use_eager_attention(model, "teacher")
    model.eval()
    blocks = list(range(1, num_layers(model) + 1))
    rows = min(args.max_rows, tokens.num_rows("validation"))
    ids = torch.from_numpy(tokens.blocks("validation")[:rows].astype(np.int64))
    # As many relation heads as attention heads, unless given (they must divide the value width, which
    # grouped-query attention makes narrower than the model).
    relation_heads = args.relation_heads or int(model.config.num_attention_heads)
    truth = {}
    for lo in range(0, rows, 16):
        part = teacher_targets(model, ids[lo:lo + 16], tokens.vocab_size, 1, attention_layers=blocks,
                               value_relation_heads=relation_heads)
        for name, tensor in part.items():
            if fmt.SIGNALS["attention"].owns(name):
                truth.setdefault(name, []).append(tensor)
    truth = {name: torch.cat(parts) for name, parts in truth.items()}
    print(f"teacher: {num_layers(model)} blocks, {model.config.num_attention_heads} heads, T = "
          f"{tokens.block_size}; {rows} validation rows; value relations with {relation_heads} heads")
    print(f"{'encoding':<12} {'raw B/tok/layer':>15} {'stored':>8} {'KL':>9} {'KL(vr)':>9} {'max|e|':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for encoding, top_k in args.variants:
            config = CacheConfig(top_k=1, split="validation", attention_layers=tuple(blocks),
                                 attention_encoding=encoding, attention_top_k=top_k, attention_budget=0,
                                 relation_heads=relation_heads,
                                 batch_size=16, rows_per_chunk=8, rows_per_shard=64, device="cpu")
            store = run_capture(config, args.teacher, args.tokens, str(Path(tmp) / f"{encoding}{top_k}.zarr"))
            decoded = store.decode(store.read_rows(0, rows, fmt.signal_names(store.attrs, "attention")))
            names = fmt.signal_names(store.attrs, "attention")
            raw = sum(int(np.prod(store.group[n].shape)) * store.group[n].dtype.itemsize for n in names)
            stored = sum(stored_bytes(store, n) for n in names)
            per = store.rows * tokens.block_size * len(blocks)
            kls = {kind: np.mean([row_kl(truth[fmt.attention_array(b, kind)], decoded[fmt.attention_array(b, kind)])
                                  for b in blocks]) for kind in fmt.ATTENTION_KINDS}
            err = max(float((truth[n] - decoded[n]).abs().max()) for n in truth)
            label = f"{encoding}" + (f" K={top_k}" if encoding == "topk" else "")
            print(f"{label:<12} {raw / per:>15.1f} {stored / per:>8.1f} {kls['attention']:>9.5f} "
                  f"{kls['value_relation']:>9.5f} {err:>8.4f}")


def students(args) -> None:
    tokens = TokenStore(args.tokens)
    model, _ = load_teacher(args.teacher)
    blocks = num_layers(model)
    work = Path(args.work)
    store = work / "targets.zarr"
    config = CacheConfig(top_k=32, layers=(blocks // 2, blocks), attention_layers=(blocks // 2, blocks),
                         attention_budget=args.budget, relation_heads=args.relation_heads, batch_size=16,
                         device="cpu")
    start = time.perf_counter()
    run_capture(config, args.teacher, args.tokens, str(store))
    print(f"capture: {time.perf_counter() - start:.0f} s, {tokens.num_rows('train')} rows")
    common = dict(max_steps=args.steps, eval_every=args.steps, eval_batches=args.eval_batches, device="cpu",
                  batch_size=args.batch_size, n_layer=args.student_shape[0], n_embd=args.student_shape[1],
                  n_head=args.student_shape[2], seed=args.seed)
    runs = {"CE only": (dict(alpha=1.0), None),
            "KD (logits)": (dict(), store),
            "KD + hidden": (dict(beta=args.beta), store),
            "KD + hidden, relative": (dict(beta=args.beta, hidden_loss="relative"), store),
            "KD + TinyBERT": (dict(gamma=args.gamma_tinybert, attention_loss="tinybert"), store),
            "KD + MiniLM": (dict(gamma=args.gamma_minilm, attention_loss="minilm"), store)}
    results = {}
    for name, (settings, targets) in runs.items():
        if name != "CE only" and args.only and not any(part in name for part in args.only):
            continue
        out = work / name.replace(" ", "_").replace("+", "p").replace("(", "").replace(")", "")
        start = time.perf_counter()
        last = run_student(StudentConfig(**common, **settings), args.tokens, str(out / "model"),
                           str(targets) if targets else None, TrainFiles(val_log=str(out / "val.csv")))
        seconds = time.perf_counter() - start
        val = float((out / "val.csv").read_text().strip().splitlines()[-1].split(",")[-1])
        results[name] = (val, args.steps * args.batch_size * tokens.block_size / seconds, last)
    base = results["CE only"][1]
    print(f"{'student':<22} {'val loss':>9} {'tok/s':>8} {'÷ CE':>6}  {'attention term (last step)':>26}")
    for name, (val, rate, last) in results.items():
        print(f"{name:<22} {val:>9.4f} {rate:>8.0f} {rate / base:>6.2f}  {last.get('attention', float('nan')):>26.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("encodings", "students"))
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--max-rows", type=int, default=128)
    parser.add_argument("--topk", type=int, nargs="*", default=[4, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--relation-heads", type=int, default=0,
                        help="value-relation heads (0: the teacher's attention heads); they must divide the "
                             "teacher's value width, and for MiniLM the student's")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the hidden-state rows' term")
    parser.add_argument("--gamma-tinybert", type=float, default=1.0)
    parser.add_argument("--gamma-minilm", type=float, default=1.0)
    parser.add_argument("--student-shape", type=int, nargs=3, default=[1, 32, 2], metavar=("LAYERS", "WIDTH", "HEADS"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=[],
                        help="students: run only those whose name contains one of these (CE always runs)")
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.part == "encodings":
        args.variants = [("topk", k) for k in args.topk] + [("q8", 0), ("fp16", 0)]
        encodings(args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            args.work = args.work or tmp
            students(args)


if __name__ == "__main__":
    main()
