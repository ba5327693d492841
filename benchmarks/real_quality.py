"""Does distillation from the cache beat plain training, at every temperature, on a real teacher?

One student architecture, one data order, equal steps; rows differ only in where the KD targets come
from and at what temperature:

  ce                     hard labels only (alpha = 1)
  topk/{tail} tau=T      the cached top-k + tail (`kdcache cache`), trained at tau T with the tail
                         tempered as one atom, spread uniformly, or continued as a power-law decay
                         (at tau = the capture's 1 the three are the same loss: one row)
  sampled                the cached sampled ids (random-sampling KD), tau = 1
  topk_sampled           the cached top-k, the tail's shape from the sampled ids that fell in it, tau = 1
  dense tau=T            the teacher's full distribution over the vocabulary (computed once per row:
                         the teacher is frozen, so this is exactly online KD with the teacher in the loop)

for alpha in --alphas. Scored by `pipeline.evaluate.run_evaluate` on the validation split: loss, top-1
agreement with the teacher, ECE. Then the bars of the quality issue are checked and printed.

Teachers:
  --teacher smollm2   SmolLM2-135M-Instruct (benchmarks/smollm2.py materialises it; 49 152 ids), over
                      --documents chunks of the Python standard library's source, tokenized with its
                      own tokenizer (a token store written under --work)
  --teacher DIR       a teacher directory (`kdcache teacher`) with --tokens, e.g. the default run's;
                      --train-rows N trains on the first N rows only (as benchmarks/student_table.py)

  python benchmarks/real_quality.py --teacher smollm2 --work /tmp/rq-smollm2
  python benchmarks/real_quality.py --teacher models/teacher --tokens data/tokens --train-rows 512 --work /tmp/rq-default
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules

from pipeline import losses  # noqa: E402
from pipeline.config import CacheConfig, EvaluateConfig, PrepareConfig, StudentConfig, TeacherConfig  # noqa: E402
from pipeline.data.corpus import stdlib_files  # noqa: E402
from pipeline.data.tokens import TokenStore, prepare_tokens  # noqa: E402
from pipeline.evaluate import run_evaluate  # noqa: E402
from pipeline.student import run_student  # noqa: E402
from pipeline.student.setup import build_student, save_student  # noqa: E402
from pipeline.tasks import CAUSAL  # noqa: E402
from pipeline.teacher.capture import run_capture  # noqa: E402
from pipeline.teacher.load import load_teacher  # noqa: E402
from pipeline.training.loader import BlockStream  # noqa: E402
from pipeline.training.loop import train_loop  # noqa: E402
from pipeline.training.teacher import materialise_teacher  # noqa: E402


def stdlib_documents(count: int, chars: int, seed: int) -> list[str]:
    """`count` chunks of `chars` characters of standard-library source, drawn reproducibly."""
    chunks = []
    for path in stdlib_files()[:400]:
        text = path.read_text(encoding="utf-8", errors="replace")
        chunks += [text[i:i + chars] for i in range(0, len(text) - chars, chars)]
    return random.Random(seed).sample(chunks, count)


def smollm2_setup(args) -> tuple[str, str]:
    """(tokens, teacher) directories for SmolLM2 over stdlib chunks, built once under --work."""
    from smollm2 import materialise

    work = Path(args.work)
    model_dir = materialise(work / "smollm2")
    corpus = work / "corpus"
    if not corpus.exists():
        corpus.mkdir(parents=True)
        for i, text in enumerate(stdlib_documents(args.documents, 1800, seed=0)):
            (corpus / f"doc{i:03d}.txt").write_text(text)
    tokens, teacher = work / "tokens", work / "teacher"
    if not (tokens / "meta.json").exists():
        prepare_tokens(PrepareConfig(corpus=str(corpus), tokenizer=str(model_dir), block_size=args.block_size,
                                     val_fraction=0.2), tokens)
    if not (teacher / "kdcache.json").exists():
        materialise_teacher(TeacherConfig(model=str(model_dir)), str(tokens), str(teacher))
    return str(tokens), str(teacher)


@torch.inference_mode()
def dense_logprobs(teacher_dir: str, tokens_dir: str, batch_size: int = 8) -> torch.Tensor:
    """(R, T, V) float16 log-probs of the teacher at tau = 1 for every train row."""
    model, _ = load_teacher(teacher_dir)
    model.eval()
    tokens = TokenStore(tokens_dir)
    blocks = torch.from_numpy(tokens.blocks("train").astype(np.int64))
    out = []
    for lo in range(0, len(blocks), batch_size):
        logits = model(input_ids=blocks[lo:lo + batch_size]).logits[..., :tokens.vocab_size].float()
        out.append(torch.log_softmax(logits, -1).half())
    return torch.cat(out)


class DenseKD:
    """alpha·CE + (1 − alpha)·tau²·KL(p_tau ‖ q_tau) against the teacher's whole distribution per row."""

    def __init__(self, teacher_logprobs: torch.Tensor, vocab_size: int, alpha: float, temperature: float):
        self.teacher, self.vocab_size = teacher_logprobs, vocab_size
        self.alpha, self.temperature = alpha, temperature

    def __call__(self, model, batch: dict, progress: float = 0.0) -> dict:
        ids, tau = batch["input_ids"], self.temperature  # (B, T)
        logits = model(input_ids=ids).logits[..., : self.vocab_size].float().flatten(0, 1)  # (N, V)
        labels, mask = CAUSAL.labels(ids)
        ce = losses.cross_entropy(logits, labels.flatten(), mask.flatten())
        p = torch.log_softmax(self.teacher[batch["row"].cpu()].to(logits.device).float().flatten(0, 1) / tau, -1)
        kd = losses.kl_from_logprobs(p, torch.log_softmax(logits / tau, -1)).mean()  # every position, as KD
        return {"ce": ce, "kd": kd, "loss": self.alpha * ce + (1 - self.alpha) * tau**2 * kd}


def train_dense(config: StudentConfig, tokens_dir: str, out: str, teacher_logprobs: torch.Tensor) -> None:
    tokens = TokenStore(tokens_dir)
    model = build_student(config, tokens)
    objective = DenseKD(teacher_logprobs, tokens.vocab_size, config.alpha, config.temperature)
    stream = BlockStream(tokens_dir, "train", shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    history = train_loop(model, stream, config, objective, torch.device("cpu"), f"dense {Path(out).name}")
    save_student(model, tokens, out, config, history)


def plan(args) -> list[tuple[str, float, float, str, str]]:
    """(name, alpha, tau, kind, tail model) of every student row but CE."""
    rows = []
    for alpha in args.alphas:
        for tau in args.temperatures:
            tails = ["atom"] if tau == 1.0 else args.tail_models
            rows += [(f"topk/{tail} a={alpha} t={tau:g}", alpha, tau, "topk", tail) for tail in tails]
            rows.append((f"dense a={alpha} t={tau:g}", alpha, tau, "dense", ""))
        rows.append((f"sampled a={alpha} t=1", alpha, 1.0, "sampled", ""))
        rows.append((f"topk_sampled a={alpha} t=1", alpha, 1.0, "topk_sampled", ""))
    suffix = f" s={args.seed}" if args.seed else ""  # another seed: another student of each row
    return [(name + suffix, *rest) for name, *rest in rows]


def check_bars(metrics: dict, args) -> list[str]:
    """The quality issue's bars, each as a line saying whether it holds and by how much."""
    lines, ce = [], metrics["ce"]["val_loss"]

    def val(name):
        return metrics[name]["val_loss"]

    for alpha in args.alphas:
        for name in [n for n in metrics if f"a={alpha} " in n and n.split(" t=")[-1] in ("1", "2")]:
            lines.append(f"{'PASS' if val(name) < ce else 'MISS'}  {name} beats CE: {val(name):.4f} vs {ce:.4f}")
        pairs = [(f"topk/atom a={alpha} t=1", f"dense a={alpha} t=1", 0.01),
                 (f"topk_sampled a={alpha} t=1", f"dense a={alpha} t=1", 0.01),
                 (f"topk/uniform a={alpha} t=2", f"dense a={alpha} t=2", 0.02),
                 (f"topk/power a={alpha} t=2", f"dense a={alpha} t=2", 0.02),
                 (f"sampled a={alpha} t=1", f"dense a={alpha} t=1", 0.005)]
        for name, dense, bar in pairs:
            if name in metrics and dense in metrics:
                gap = val(name) / val(dense) - 1
                lines.append(f"{'PASS' if gap <= bar else 'MISS'}  {name} within {bar:.1%} of {dense}: "
                             f"{gap:+.2%}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2", help="smollm2, or a teacher directory")
    parser.add_argument("--tokens", help="token store (with a teacher directory)")
    parser.add_argument("--work", default="/tmp/kdcache-real-quality")
    parser.add_argument("--documents", type=int, default=30, help="smollm2: stdlib chunks of 1800 chars")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--train-rows", type=int, default=0, help="train on the first N train rows (0: all)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--tail-models", nargs="+", default=list(losses.TAIL_MODELS))
    parser.add_argument("--seed", type=int, default=0, help="student seed (init and data order); not 0: rows "
                        "named '... s=SEED', beside those of seed 0")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="train nothing: score the rows already trained under --work (e.g. by runs with other --alphas)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.teacher == "smollm2":
        tokens, teacher = smollm2_setup(args)
    else:
        from student_table import subset

        args.tokens = args.tokens or "data/tokens"
        tokens, teacher = subset(argparse.Namespace(**{**vars(args), "teacher": args.teacher})) \
            if args.train_rows else (args.tokens, args.teacher)
    store_info = TokenStore(tokens)
    print(f"[quality] {store_info.num_rows('train')} train / {store_info.num_rows('validation')} validation rows "
          f"of {store_info.block_size} tokens, vocabulary {store_info.vocab_size}", flush=True)

    start = time.perf_counter()
    store = run_capture(CacheConfig(top_k=args.top_k, samples=args.samples, batch_size=8, device="cpu",
                                    rows_per_chunk=8, rows_per_shard=64), teacher, tokens, str(work / "targets.zarr"))
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    teacher_logprobs = None if args.evaluate_only else dense_logprobs(teacher, tokens)
    dense_s = time.perf_counter() - start
    print(f"[quality] capture {capture_s:.0f} s, dense teacher pass {dense_s:.0f} s", flush=True)

    base = StudentConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, max_steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, warmup_steps=max(1, args.steps // 10),
                         seed=0, device="cpu", verify=False)
    base = replace(base, seed=args.seed)
    ce_name = f"ce s={args.seed}" if args.seed else "ce"
    students = {ce_name: work / ("student_" + ce_name.replace(" ", "_"))}
    if not (students[ce_name] / "model.safetensors").exists() and not args.evaluate_only:
        run_student(replace(base, alpha=1.0), tokens, str(students[ce_name]))
    for name, alpha, tau, kind, tail in plan(args):
        out = work / ("student_" + name.replace("/", "_").replace(" ", "_"))
        if (out / "model.safetensors").exists():
            students[name] = out
            continue  # a finished row of an earlier run
        if args.evaluate_only:
            continue
        students[name] = out
        config = replace(base, alpha=alpha, temperature=tau, tail_model=tail or "atom",
                         kd_signal=kind if kind in ("sampled", "topk_sampled") else "topk")
        started = time.perf_counter()
        if kind == "dense":
            train_dense(config, tokens, str(out), teacher_logprobs)
        else:
            run_student(config, tokens, str(out), str(store.path))
        print(f"[quality] {name}: {time.perf_counter() - started:.0f} s", flush=True)

    if (work / "student_ce" / "model.safetensors").exists():
        students.setdefault("ce", work / "student_ce")  # the baseline of every row, whatever the seed
    evaluation = EvaluateConfig(batch_size=16, reference="teacher", latency_rounds=1)
    models = {"teacher": teacher, **{name: str(path) for name, path in students.items()}}
    metrics = run_evaluate(evaluation, tokens, models, str(work / "metrics.json"))["models"]
    ce = metrics["ce"]["val_loss"]
    print(f"\n{args.steps} steps x {args.batch_size} rows, student {args.n_layer}L x {args.n_embd}, top-k {args.top_k}, "
          f"{args.samples} samples; teacher {metrics['teacher']['params']:,} parameters, val_loss "
          f"{metrics['teacher']['val_loss']:.4f}")
    print(f"{'student':>24} {'val_loss':>9} {'vs CE':>8} {'top-1 agr':>9} {'ECE':>7}")
    for name, m in metrics.items():
        if name != "teacher":
            print(f"{name:>24} {m['val_loss']:9.4f} {m['val_loss'] - ce:+8.4f} {m['top1_agreement']:9.3f} "
                  f"{m['ece']:7.4f}")
    print()
    bars = check_bars(metrics, args)
    print("\n".join(bars))
    (work / "table.json").write_text(json.dumps({"metrics": metrics, "bars": bars}, indent=2))


if __name__ == "__main__":
    main()
