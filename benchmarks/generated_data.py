"""Sequence-level KD: students on the corpus, on teacher-written data, and on both, at equal steps.

One run, on the default teacher's recipe (the `teacher` section of --params, --teacher-steps steps)
over the embedded corpus (the `prepare` section, --max-documents documents):

  generation  tokens/s of `generate` with the KV cache vs recomputing the whole sequence every step
              (the same prompts and generators: the tokens must come out equal)
  students    the `student` section of --params for --steps steps, each with cached KD (`cache` section)
              from the same teacher, on
                original    the corpus's train split
                generated   `generate` from --prompts prompts of the train split
                mixed       `prepare --mix original generated`
              plus `ce` (original, hard labels only) as the floor; all scored on the ORIGINAL
              validation split: val_loss, top-1 agreement with the teacher, ECE.

Everything is written under --work and reused when present (delete it to start over).

  nice -n 10 python benchmarks/generated_data.py --work /tmp/generated-data
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
import yaml

from pipeline.config import CacheConfig, EvaluateConfig, GenerateConfig, PrepareConfig, StudentConfig, TeacherConfig
from pipeline.data.mix import mix_token_stores
from pipeline.data.tokens import TokenStore, prepare_tokens
from pipeline.evaluate import run_evaluate
from pipeline.student import run_student
from pipeline.teacher.capture import run_capture
from pipeline.teacher.generate import prompt_generator, draw_prompts, generate_batch, run_generate
from pipeline.teacher.load import load_teacher
from pipeline.training.teacher import materialise_teacher


def section(config_cls, values: dict, **overrides):
    names = {f.name for f in fields(config_cls)}
    return config_cls(**{**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names},
                         **overrides})


def timed(what: str, call):
    start = time.perf_counter()
    result = call()
    print(f"[bench] {what}: {time.perf_counter() - start:.0f} s", flush=True)
    return result


def throughput(teacher_dir: str, tokens: TokenStore, config: GenerateConfig, batches: int) -> dict:
    """tokens/s of generate_batch over `batches` batches, with and without the KV cache (interleaved)."""
    model, _ = load_teacher(teacher_dir)
    model.eval()
    prompts = torch.from_numpy(draw_prompts(tokens.blocks("train"), config.batch_size * batches,
                                            config.prompt_tokens, config.seed))
    seconds, outputs = {True: 0.0, False: 0.0}, {True: [], False: []}
    for b in range(batches):
        for kv_cache in (True, False):
            lo, hi = b * config.batch_size, (b + 1) * config.batch_size
            generators = [prompt_generator(config.seed, i) for i in range(lo, hi)]
            start = time.perf_counter()
            outputs[kv_cache].append(generate_batch(model, prompts[lo:hi], config.max_new_tokens, tokens.vocab_size,
                                                    config.temperature, config.top_p, generators, kv_cache))
            seconds[kv_cache] += time.perf_counter() - start
    new_tokens = batches * config.batch_size * config.max_new_tokens
    return {"with": new_tokens / seconds[True], "without": new_tokens / seconds[False],
            "same_tokens": all(torch.equal(a, b) for a, b in zip(outputs[True], outputs[False]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--work", default="/tmp/generated-data")
    parser.add_argument("--max-documents", type=int, default=120)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--throughput-batches", type=int, default=2)
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    original = work / "tokens"
    if not (original / "meta.json").exists():
        timed("prepare", lambda: prepare_tokens(section(PrepareConfig, params["prepare"],
                                                        max_documents=args.max_documents), original))
    tokens = TokenStore(original)
    teacher = work / "teacher"
    if not (teacher / "kdcache.json").exists():
        timed("teacher", lambda: materialise_teacher(section(TeacherConfig, params["teacher"], max_steps=args.teacher_steps,
                                                             eval_every=0), str(original), str(teacher)))
    generate_config = GenerateConfig(prompts=args.prompts, prompt_tokens=16,
                                     max_new_tokens=tokens.block_size - 16, batch_size=16)
    generated = work / "generated"
    if not (generated / "meta.json").exists():
        timed("generate", lambda: run_generate(generate_config, str(teacher), str(original), str(generated)))
    mixed = work / "mixed"
    if not (mixed / "meta.json").exists():
        mix_token_stores(PrepareConfig(mix=(str(original), str(generated))), mixed)
    speed = timed("throughput", lambda: throughput(str(teacher), tokens, generate_config, args.throughput_batches))

    cache_config = section(CacheConfig, params["cache"])
    student_config = section(StudentConfig, params["student"], max_steps=args.steps, eval_every=0)
    rows = {}
    for name, store in (("original", original), ("generated", generated), ("mixed", mixed)):
        targets = work / f"{name}.zarr"
        timed(f"cache {name}", lambda: run_capture(cache_config, str(teacher), str(store), str(targets)))
        timed(f"student {name}", lambda: run_student(student_config, str(store), str(work / f"student_{name}"),
                                                     [str(targets)]))
        rows[name] = TokenStore(store).num_rows("train")
    timed("student ce", lambda: run_student(replace(student_config, alpha=1.0), str(original), str(work / "student_ce")))
    rows["ce"] = rows["original"]
    models = {"teacher": str(teacher), **{name: str(work / f"student_{name}") for name in rows}}
    result = run_evaluate(EvaluateConfig(batch_size=32, latency_rounds=1), str(original), models,
                          str(work / "metrics.json"))["models"]

    print(f"\ngeneration ({generate_config.batch_size} prompts x {generate_config.prompt_tokens} + "
          f"{generate_config.max_new_tokens} new tokens, {args.throughput_batches} batches): "
          f"KV cache {speed['with']:,.0f} tok/s, no cache {speed['without']:,.0f} tok/s, "
          f"ratio {speed['with'] / speed['without']:.2f}x, same tokens: {speed['same_tokens']}")
    print(f"students: {args.steps} steps each, batch {student_config.batch_size}, alpha {student_config.alpha}; "
          f"scored on the original validation split ({TokenStore(original).num_rows('validation')} blocks)")
    print(f"{'data':>10} {'train rows':>10} {'val_loss':>9} {'vs original':>11} {'top1 agr.':>9} {'ECE':>7}")
    base = result["original"]["val_loss"]
    for name in ("teacher", *rows):
        m = result[name]
        print(f"{name:>10} {rows.get(name, ''):>10} {m['val_loss']:9.4f} {m['val_loss'] / base:11.3f} "
              f"{m['top1_agreement']:9.3f} {m['ece']:7.4f}")


if __name__ == "__main__":
    main()
