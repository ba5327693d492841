"""Students at equal steps, one per kind of teacher signal: validation loss and calibration side by side.

Rows (all the same student, data order and number of steps; settings from the `student` section of
--params, steps from --steps):

  ce            hard labels only (alpha = 1)
  topk_{enc}    cached top-k targets in each encoding of `kdcache encodings`
  sampled       cached sampled targets (--top-k 0 --samples N)
  online_dense  the teacher in the loop over the full vocabulary (no cache): the dense-KD reference

Captures use the `cache` section of --params with the encoding / sampling changed, written under
--work (a complete capture there is reused, an interrupted one resumed). To save teacher passes on a
CPU, the fp32 capture is run once and every other encoding is transcoded from it: the capture encodes
the same float32 log-probs with the same `encode.encode_topk_logprobs`, so the stores are identical
to `kdcache cache --encoding E` on the same device (--no-transcode runs each capture instead).

Each student is scored by `pipeline.evaluate.run_evaluate` on the validation split: loss, ECE (15 bins) and top-1 agreement
with the teacher. Columns: bytes/tok of the store, wall seconds of training (the machine may be
shared: indicative only), val_loss, ECE, top-1 agreement.

--train-rows N keeps the captures affordable on a CPU: the students then train on the first N rows of
the train split only (a token store written under --work: those rows, the whole validation split,
the same tokenizer), and the teacher is copied beside it, marked as trained on that store (it was
trained on a superset of it), so that `cache` accepts the pair.

  python benchmarks/student_table.py --tokens /work/default-run/data/tokens \
      --teacher /work/default-run/models/teacher --steps 400 --train-rows 4096 --work /tmp/student-table
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from pipeline.targets.format import array_specs as capture_array_specs
from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig, EvaluateConfig, StudentConfig
from pipeline.student import run_student
from pipeline.evaluate import run_evaluate
from pipeline.targets import codecs
from pipeline.targets import format as fmt
from pipeline.targets.codecs import ENCODINGS
from pipeline.targets.reader import TargetsStore
from pipeline.targets.stats import summarize
from pipeline.targets.writer import TargetsWriter
from pipeline.models import INFO_FILE
from pipeline.student import run_student
from pipeline.data.tokens import TokenStore
from pipeline.data.tokens import _write_split as write_split


def capture(name: str, config: CacheConfig, args) -> tuple[str, float]:
    """(store path, bytes per token) of one capture under --work."""
    out = Path(args.work) / f"targets_{name}.zarr"
    start = time.perf_counter()
    store = run_capture(config, args.teacher, args.tokens, str(out))
    print(f"[table] capture {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return str(out), summarize(store)["bytes_per_token"]


def subset(args) -> tuple[str, str]:
    """(tokens, teacher) directories for the first --train-rows train rows (see the module docstring)."""
    work, source = Path(args.work), TokenStore(args.tokens)
    tokens_out, teacher_out = work / "tokens", work / "teacher"
    if not (tokens_out / "meta.json").exists():
        tokens_out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source.path / "tokenizer", tokens_out / "tokenizer", dirs_exist_ok=True)
        shutil.copy(source.path / "validation.arrow", tokens_out / "validation.arrow")
        train = source.blocks("train")[: args.train_rows]
        write_split(tokens_out / "train.arrow", train, source.vocab_size)
        meta = {**source.meta, "rows": {**source.meta["rows"], "train": len(train)},
                "fingerprint": f"{source.fingerprint}-first{len(train)}",
                "settings": {**source.meta["settings"], "train_rows": len(train)}}
        (tokens_out / "meta.json").write_text(json.dumps(meta, indent=2))
    if not (teacher_out / INFO_FILE).exists():
        shutil.copytree(args.teacher, teacher_out, dirs_exist_ok=True)
        info = json.loads((teacher_out / INFO_FILE).read_text())
        info["tokens_fingerprint"] = json.loads((tokens_out / "meta.json").read_text())["fingerprint"]
        (teacher_out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return str(tokens_out), str(teacher_out)


def transcode(source: str, encoding: str, args) -> tuple[str, float]:
    """An fp32 store re-encoded in `encoding`, shard by shard: what a capture in that encoding writes."""
    store = TargetsStore(source)
    out = Path(args.work) / f"targets_topk_{encoding}.zarr"
    identity = {key: store.attrs[key] for key in fmt.IDENTITY_KEYS}
    identity["encoding"] = encoding
    writer = TargetsWriter(out, identity, capture_array_specs(identity))
    for index in writer.pending():
        start, stop = writer.ranges[index]
        stored = store.read_rows(start, stop, [fmt.TOPK_IDS, fmt.TOPK_LOGPROBS, fmt.TAIL_LOGMASS])
        ids, logprobs = (torch.from_numpy(stored.pop(name)) for name in (fmt.TOPK_IDS, fmt.TOPK_LOGPROBS))
        # encode_topk, not the values alone: some encodings (sqd) store the ids their own way.
        writer.write_shard(index, {**stored, **fmt.encode_topk(ids.long(), logprobs, encoding,
                                                                  identity["ids_dtype"])})
    writer.finish()
    return str(out), summarize(TargetsStore(out))["bytes_per_token"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="data/tokens")
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--work", default="/tmp/kdcache-student-table", help="captures and students go here")
    parser.add_argument("--steps", type=int, default=0, help="student steps (0: params.yaml's max_steps)")
    parser.add_argument("--samples", type=int, default=12, help="draws per position of the sampled capture")
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS))
    parser.add_argument("--eval-batches", type=int, default=0, help="validation batches (0: all)")
    parser.add_argument("--train-rows", type=int, default=0, help="train on the first N rows only (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-transcode", action="store_true", help="run the teacher for every encoding")
    args = parser.parse_args()

    params = yaml.safe_load(open(args.params))
    cache_base = CacheConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in params["cache"].items()})
    cache_base = replace(cache_base, layers=())  # the table compares output targets only
    student = StudentConfig(**params["student"])
    if args.steps:
        student = replace(student, max_steps=args.steps, epochs=0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_rows:
        args.tokens, args.teacher = subset(args)

    if args.no_transcode:
        stores = {f"topk_{e}": capture(f"topk_{e}", replace(cache_base, encoding=e, samples=0), args)
                  for e in args.encodings}
    else:
        reference = capture("topk_fp32", replace(cache_base, encoding="fp32", samples=0), args)
        stores = {f"topk_{e}": reference if e == "fp32" else transcode(reference[0], e, args)
                  for e in args.encodings}
    stores["sampled"] = capture("sampled", replace(cache_base, top_k=0, samples=args.samples), args)

    seconds, bytes_per_token = {}, {"ce": 0.0, "online_dense": 0.0}
    runs = {"ce": lambda out: run_student(replace(student, alpha=1.0), args.tokens, out)}
    for name, (path, bpt) in stores.items():
        runs[name] = lambda out, path=path: run_student(student, args.tokens, out, path)
        bytes_per_token[name] = bpt
    runs["online_dense"] = lambda out: run_student(replace(student, mode="online", online_top_k=0), args.tokens, out, teacher_dir=args.teacher)
    for name, train in runs.items():
        start = time.perf_counter()
        train(str(work / f"student_{name}"))
        seconds[name] = time.perf_counter() - start
        print(f"[table] student {name}: {seconds[name]:.0f} s", flush=True)

    models = {"teacher": args.teacher, **{name: str(work / f"student_{name}") for name in runs}}
    config = EvaluateConfig(batch_size=32, max_batches=args.eval_batches, reference="teacher", latency_rounds=1)
    metrics = run_evaluate(config, args.tokens, models, str(work / "metrics.json"))["models"]

    rows = TokenStore(args.tokens).num_rows("train")
    print(f"\n{student.max_steps} steps x batch {student.batch_size} on {rows} train rows, student "
          f"{student.n_layer}L x {student.n_embd}, alpha {student.alpha}, T {student.temperature}, "
          f"loss {student.loss}; "
          f"validation split ({metrics['teacher']['params']:,}-parameter teacher)")
    print(f"{'student':>14} {'bytes/tok':>9} {'train s':>8} {'val_loss':>9} {'ECE':>7} {'top-1 agr':>9}")
    for name, m in metrics.items():
        size = f"{bytes_per_token[name]:9.1f}" if name in bytes_per_token else f"{'':>9}"
        train_s = f"{seconds[name]:8.0f}" if name in seconds else f"{'':>8}"
        print(f"{name:>14} {size} {train_s} {m['val_loss']:9.4f} {m['ece']:7.4f} {m['top1_agreement']:9.3f}")
    (work / "table.json").write_text(json.dumps({"metrics": metrics, "train_seconds": seconds,
                                                 "bytes_per_token": bytes_per_token}, indent=2))


if __name__ == "__main__":
    main()
