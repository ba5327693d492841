"""Run the teacher once over a token-store split and write the targets store (resumable).

What is stored, and how, is targets/format.py's; this file runs the teacher batch by batch, shard
by shard, and hands each shard's tensors to the writer.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

from pipeline import runtime
from pipeline.config import CacheConfig
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.models import check_fits, hidden_size, num_heads, num_layers, use_eager_attention, value_width
from pipeline.progress import progress
from pipeline.targets import basis as hidden_basis
from pipeline.targets import codecs
from pipeline.targets import format as fmt
from pipeline.targets.ids import ids_dtype
from pipeline.location import Location
from pipeline.targets.lock import WriterLock
from pipeline.targets.reader import TargetsStore
from pipeline.targets.writer import TargetsWriter
from pipeline.teacher.load import check_layers, check_teacher_task, check_teacher_tokenizer, load_teacher
from pipeline.teacher.background import BackgroundJobs
from pipeline.teacher.signals import logit_targets, teacher_forward


def capture_identity(config: CacheConfig, tokens: TokenStore, teacher_info: dict, model) -> dict:
    """The attributes that say what this capture holds (format.IDENTITY_KEYS)."""
    return {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
        "tokens_fingerprint": tokens.fingerprint, "teacher_fingerprint": teacher_info["fingerprint"],
        "split": config.split, "rows": tokens.num_rows(config.split), "block_size": tokens.block_size,
        "vocab_size": tokens.num_outputs, "capture_temperature": config.capture_temperature,
        "top_k": capture_top_k(config, tokens), "top_p": config.top_p, "min_k": config.min_k,
        "encoding": config.encoding, "ids_dtype": ids_dtype(tokens.num_outputs),
        "layers": sorted(set(config.layers)), "hidden_size": hidden_size(model),
        "hidden_dtype": config.hidden_dtype, "rows_per_chunk": config.rows_per_chunk,
        "rows_per_shard": config.rows_per_shard, "teacher_num_layers": num_layers(model),
        "samples": config.samples, "seed": config.seed,
        "hidden_rank": config.hidden_rank, "hidden_fit_rows": config.hidden_fit_rows if config.hidden_rank else 0,
        "task": tokens.task_name, "mask_count": int(tokens.meta.get("mask_count", 0)),
        **attention_identity(config, model, tokens),
    }


def attention_identity(config: CacheConfig, model, tokens: TokenStore) -> dict:
    """The attention fields of a capture's identity, refusing (before the teacher runs) a layer the
    teacher lacks, value relations it cannot compute, or an encoding over --attention-budget."""
    layers, block = sorted(set(config.attention_layers)), tokens.block_size
    if not layers:
        return {"attention_layers": [], "attention_encoding": "", "attention_top_k": 0, "attention_heads": 0,
                "value_relation_heads": 0}
    if tokens.task_name != "causal":  # the encodings and value relations assume causal rows (keys 0..q)
        raise KdcacheError(f"--attention-layer captures causal attention (each query over keys 0..q); the "
                           f"{tokens.task_name} token store's teacher attends both ways. Capture without "
                           f"--attention-layer.")
    blocks = num_layers(model)
    bad = [layer for layer in layers if layer > blocks]
    if bad:
        raise KdcacheError(f"teacher has attention in blocks 1..{blocks}; --attention-layer {bad} does not exist.")
    heads, relation_heads = num_heads(model), 0
    if config.value_relations:
        relation_heads = config.relation_heads or heads
        width = value_width(model, 1)
        if width % relation_heads:
            raise KdcacheError(f"--relation-heads {relation_heads} does not divide the teacher's value width "
                               f"{width}; choose a divisor of {width}.")
    encoding, budget = config.attention_encoding, config.attention_budget
    if encoding == "topk" and block > 65536:
        raise KdcacheError(f"the topk attention encoding stores keys as uint16 and cannot index {block} "
                           f"positions; use --attention-encoding q8.")
    size = lambda k: sum(codecs.attention_bytes_per_token(encoding, h, block, k)  # noqa: E731
                         for h in (heads, relation_heads) if h)
    top_k = 0
    if encoding == "topk":
        top_k = min(config.attention_top_k or block, block)
        if not config.attention_top_k and budget:
            top_k = min(block, int(budget // size(1)))  # as many keys as the budget holds
            if top_k < 1:
                raise KdcacheError(f"--attention-budget {budget} bytes/token/layer cannot hold one key per "
                                   f"row of {heads + relation_heads} matrices ({size(1):g} bytes); raise it to "
                                   f"{size(1):g}, or capture --no-value-relations.")
    if budget and size(top_k) > budget:
        per_key = sum(codecs.attention_bytes_per_token("topk", h, block, 1) for h in (heads, relation_heads) if h)
        raise KdcacheError(f"attention encoding {encoding}"
                           + (f" with {top_k} keys per row" if encoding == "topk" else "")
                           + f" needs {size(top_k):g} bytes/token/layer, over --attention-budget {budget}; "
                           f"raise the budget, or use --attention-encoding topk with --attention-top-k "
                           f"{min(int(budget // per_key), block)} or less.")
    use_eager_attention(model, "teacher")
    return {"attention_layers": layers, "attention_encoding": encoding, "attention_top_k": top_k,
            "attention_heads": heads, "value_relation_heads": relation_heads}


def capture_top_k(config: CacheConfig, tokens: TokenStore) -> int:
    """K: --top-k; for classification every class (C is small: the full distribution, nothing in a tail)."""
    if tokens.task_name == "classification" and config.top_k:
        return tokens.num_outputs
    return config.top_k


def _hidden_bases(config: CacheConfig, writer: TargetsWriter, model, tokens: TokenStore, device, autocast) -> dict:
    """layer -> (mean (D,), basis (D, P)) with --hidden-rank P; {} without.

    Fitted on the first `hidden_fit_rows` rows and written before shard 0; a resumed capture reads the
    stored basis back (its shards were projected on it), never refits.
    """
    layers, rank = sorted(set(config.layers)), config.hidden_rank
    if not rank:
        return {}
    if writer.unsharded:
        print("[cache] reusing the hidden-state basis stored in the capture")
        stored = {}
        for layer in layers:
            basis_name, mean_name = fmt.hidden_basis_arrays(layer)
            stored[layer] = (writer.group[mean_name][...], writer.group[basis_name][...])
        return stored
    moments = {layer: hidden_basis.Moments(hidden_size(model)) for layer in layers}
    rows = min(config.hidden_fit_rows, tokens.num_rows(config.split))
    for lo in range(0, rows, config.batch_size):
        batch = {k: v.to(device) for k, v in tokens.rows(config.split, lo, min(lo + config.batch_size, rows)).items()}
        with torch.inference_mode(), autocast:
            hidden_states = model(**tokens.task.model_inputs(batch), output_hidden_states=True).hidden_states
        for layer in layers:
            moments[layer].add(hidden_states[layer])
    bases, arrays, kept = {}, {}, {}
    for layer in layers:
        mean, basis, kept[str(layer)] = moments[layer].fit(rank)
        bases[layer] = (mean, basis)
        basis_name, mean_name = fmt.hidden_basis_arrays(layer)
        arrays.update({basis_name: basis, mean_name: mean})
    writer.write_unsharded(arrays, {"hidden_variance_kept_fit": kept})
    print(f"[cache] hidden-state basis of rank {rank} fitted on {rows} rows; variance kept: {kept}")
    return bases


def _project_hidden(targets: dict, bases: dict, energy: dict) -> None:
    """Replace each layer's hidden states by their coefficients; add (Σ‖c‖², Σ‖h − μ‖²) to energy."""
    for layer, (mean, basis) in bases.items():
        name = fmt.hidden_array(layer)
        coefficients = hidden_basis.project(targets[name], mean, basis)
        kept, total = hidden_basis.energy(targets[name], coefficients, mean)
        energy[str(layer)] = [a + b for a, b in zip(energy.get(str(layer), [0.0, 0.0]), (kept, total))]
        targets[name] = coefficients


def _variance_kept(shard_stats: dict) -> dict[str, float]:
    """Per layer Σ‖c‖² / Σ‖h − μ‖² over every shard's recorded energy: the whole capture."""
    totals = {}
    for stats in shard_stats.values():
        for layer, (kept, total) in stats.get("hidden_energy", {}).items():
            old = totals.get(layer, (0.0, 0.0))
            totals[layer] = (old[0] + kept, old[1] + total)
    return {layer: kept / total if total > 0 else 1.0 for layer, (kept, total) in totals.items()}


def run_capture(config: CacheConfig, teacher_dir: str, tokens_dir: str, out: str, overwrite: bool = False,
                force: bool = False) -> TargetsStore:
    """Capture targets for every row of `config.split`; skips shards a previous run finished.

    out: a local directory or an fsspec URL. overwrite: delete a store holding another capture instead
    of refusing it. force: take over the store's lock whoever holds it. Under torchrun rank r of N
    captures shards r, r + N, ...; rank 0 holds the lock, prepares the store and marks it complete.
    """
    location = Location(out)  # refuses an unknown URL protocol, or one whose package is missing, first
    location.check_writable()
    tokens = TokenStore(tokens_dir)
    model, info = load_teacher(teacher_dir)
    check_teacher_task(info, tokens, teacher_dir)
    check_fits(model, tokens, "teacher")
    check_layers(model, config.layers)
    if config.hidden_rank > hidden_size(model):
        raise KdcacheError(f"--hidden-rank {config.hidden_rank} is larger than the teacher's hidden size "
                           f"({hidden_size(model)}); choose at most {hidden_size(model)}, or 0 for full width.")
    if config.top_k > tokens.num_outputs and tokens.task_name != "classification":
        raise KdcacheError(f"--top-k {config.top_k} is larger than the vocabulary ({tokens.vocab_size}).")
    ids_dtype(tokens.num_outputs)  # refuses vocabularies too large to pack, before the teacher runs
    # Any token store in the teacher's own tokenizer will do: the one it was trained on, or one written
    # by `generate` or `prepare --mix` from it.
    check_teacher_tokenizer(teacher_dir, tokens)
    identity = capture_identity(config, tokens, info, model)
    device = runtime.resolve_device(config.device)
    model.to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    rank, world_size, main = runtime.rank(), runtime.world_size(), runtime.is_main()
    lock = WriterLock(location, force)
    try:
        writer, bases = _open_store(config, location, identity, lock, overwrite, model, tokens, device, autocast)
        _capture_shards(config, writer, lock, bases, model, tokens, identity, device, autocast, rank,
                        world_size)  # returns once every rank's records exist
        if main:
            lock.check()
            writer.finish({"hidden_variance_kept": _variance_kept(writer.shard_stats)} if bases else None)
    finally:
        if main:
            lock.release()
    runtime.barrier()  # `complete` is written before any rank opens the store
    return TargetsStore(out)


def _open_store(config, location, identity, lock, overwrite, model, tokens, device, autocast):
    """(writer, hidden bases) on every rank. Rank 0 takes the lock and creates, checks or repairs the
    store (and fits a hidden basis) while the others wait; its error, if any, stops them all."""
    specs, writer, bases, error = fmt.array_specs(identity), None, {}, None
    if runtime.is_main():
        try:
            lock.acquire()
            writer = TargetsWriter(location, identity, specs, overwrite=overwrite)
            bases = _hidden_bases(config, writer, model, tokens, device, autocast)
        except KdcacheError as failure:
            error = failure
    shared = runtime.from_main((str(error) if error else None, lock.mine))
    if error is not None:
        raise error
    if shared[0] is not None:
        raise KdcacheError(shared[0])
    lock.mine = shared[1]  # every rank checks that rank 0 still holds the lock before each shard
    if writer is None:
        writer = TargetsWriter(location, identity, specs, create=False)
        bases = _hidden_bases(config, writer, model, tokens, device, autocast)
    return writer, bases


def _encode_batch(parts: list, targets: dict, reduce, bases: dict, energy: dict, identity: dict) -> None:
    """Add a batch's stored arrays to its shard's parts: the reduced logits (reduce()) with the forward's
    other arrays, hidden states projected (adding to energy), encoded."""
    if reduce is not None:
        targets.update(reduce())
    _project_hidden(targets, bases, energy)
    parts.append(fmt.encode_targets(targets, identity))


def _write_shard(writer: TargetsWriter, lock: WriterLock, index: int, parts: list, energy: dict | None) -> None:
    """Write a shard from its batches' parts, then its record (TargetsWriter.write_shard)."""
    lock.check()
    writer.write_shard(index, {name: np.concatenate([p[name] for p in parts]) for name in parts[0]},
                       {"hidden_energy": energy} if energy is not None else None)


def _capture_shards(config, writer, lock, bases, model, tokens, identity, device, autocast, rank,
                    world_size) -> None:
    """Run the teacher over this rank's pending shards, writing and recording each one; return once
    every rank's shards are recorded. Rank 0's progress bar counts every rank's tokens."""
    main, block_size = rank == 0, tokens.block_size
    everyone = writer.pending(0, 1)  # every rank's pending shards: the progress bar's total
    mine = writer.pending(rank, world_size)
    if main and len(everyone) < len(writer.ranges):
        print(f"[cache] resuming: {len(writer.ranges) - len(everyone)} of {len(writer.ranges)} shards done")
    rows_of = lambda indices: sum(writer.ranges[i][1] - writer.ranges[i][0] for i in indices)  # noqa: E731
    bar = progress(total=rows_of(everyone) * block_size, desc="capture", unit="tok", unit_scale=True,
                   disable=not main)

    def count_every_rank() -> None:
        """Rank 0's bar: the tokens of every rank's recorded shards (the others' are known by their records)."""
        if main and world_size > 1:
            recorded = writer.recorded()
            bar.n = max(bar.n, rows_of([i for i in everyone if i in recorded]) * block_size)
            bar.refresh()
    start_time = time.perf_counter()
    # On a GPU the logits are reduced to the top-k where they are, before they queue (a batch of
    # full-vocabulary logits is large); on CPU the reduction overlaps the next forward (BENCHMARKS §14).
    reduce_early = device.type != "cpu"
    with BackgroundJobs(depth=2, threads=1 if config.background_writer else 0) as jobs:
        for index in mine:
            start, stop = writer.ranges[index]
            parts, energy = [], {}
            for lo in range(start, stop, config.batch_size):
                hi = min(lo + config.batch_size, stop)
                batch = {k: v.to(device) for k, v in tokens.rows(config.split, lo, hi).items()}
                # Draws seeded by row: a resumed capture, whatever its batches, writes the same ids.
                generator = torch.Generator(device).manual_seed(config.seed * 1_000_003 + lo)
                with autocast:
                    logits, targets = teacher_forward(model, batch, tokens.num_outputs, tokens.task,
                                                      identity["layers"], identity["attention_layers"],
                                                      identity["value_relation_heads"])
                    reduce = partial(logit_targets, logits, batch, identity["top_k"], config.capture_temperature,
                                     config.samples, generator, config.top_p, config.min_k)
                    if reduce_early:
                        targets.update(reduce())
                        reduce = None
                jobs.submit(partial(_encode_batch, parts, targets, reduce, bases, energy, identity))
                bar.update((hi - lo) * block_size)
                bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start_time):,.0f}", refresh=False)
            jobs.submit(partial(_write_shard, writer, lock, index, parts, energy if bases else None))
            count_every_rank()
    runtime.barrier(while_waiting=count_every_rank)  # rank 0's bar goes on counting the others' shards
    bar.close()
