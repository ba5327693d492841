"""The training loop shared by the default teacher (CE only) and the students (see objective.py).

One loop for one process and for torchrun/DDP (pipeline/runtime.py): settings.batch_size is the
global batch, each rank takes batch_size / world_size rows of it. It can write checkpoints and resume
from them to exactly the batch sequence of an uninterrupted run (checkpoint.py), and evaluate a fixed
set of validation batches every eval_every steps.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeline import runtime
from pipeline.config import TrainSettings
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.progress import progress
from pipeline.targets.reader import TargetsStore
from pipeline.tasks import CAUSAL
from pipeline.training import checkpoint, precision
from pipeline.training.tracking import Trackers
from pipeline.training.loader import BlockStream, make_loader
from pipeline.training.shared_batches import SharedBatches
from pipeline.training.objective import Objective


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr_ratio: float = 0.1) -> float:
    """Linear warm-up to `peak`, then cosine decay to min_lr_ratio · peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


def param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (linear and token-embedding weights), none on biases, norms
    and position-embedding tables (decay there only pulls positions towards each other)."""
    positional = {id(m.weight) for module in modules for name, m in module.named_modules()
                  if isinstance(m, torch.nn.Embedding) and ("pos" in name or name.endswith("wpe"))}
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for p in module.parameters():
            if id(p) in seen or not p.requires_grad:
                continue  # tied weights appear once
            seen.add(id(p))
            (decay if p.ndim >= 2 and id(p) not in positional else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class TrainFiles:
    """What a run writes besides the model (all optional): CSV logs and its checkpoint."""

    log: str | None = None  # step, epoch, lr, loss parts: one row per optimizer step
    val_log: str | None = None  # step, val_loss: one row per evaluation
    checkpoint_dir: str | None = None  # needed by checkpoint_every > 0 and by resume
    resume: bool = False  # continue from the checkpoint in checkpoint_dir
    live_dir: str | None = None  # DVCLive directory (metrics.json, plots/metrics/*.tsv); see tracking.py
    tensorboard_dir: str | None = None  # TensorBoard event files (needs the tensorboard package)


class TrainStep(torch.nn.Module):
    """The model, the extra modules and the objective as one module: DDP must run the whole loss in
    its forward to synchronise the gradients of every parameter, the projections' included."""

    def __init__(self, model, extra_modules, objective):
        super().__init__()
        self.model, self.extra = model, torch.nn.ModuleList(extra_modules)
        self.objective = objective

    def forward(self, batch: dict, progress: float) -> dict[str, torch.Tensor]:
        return self.objective(self.model, batch, progress=progress)


def plan_steps(stream: BlockStream, settings: TrainSettings, local_batch: int) -> int:
    """Total optimizer steps: max_steps, or fewer when `epochs` passes over the data end first."""
    stream.set_epoch(0)
    if stream.batches_per_epoch(local_batch, settings.num_workers) == 0:
        raise KdcacheError(f"{len(stream.shards)} shards of {stream.rows_per_shard} rows leave a rank with no "
                           f"rows for {stream.world_size} ranks; use fewer ranks or smaller shards "
                           f"(cache --rows-per-shard).")
    limits = [settings.max_steps] if settings.max_steps else []
    if settings.epochs:
        per_epoch = []
        for epoch in range(settings.epochs):
            stream.set_epoch(epoch)
            per_epoch.append(stream.batches_per_epoch(local_batch, settings.num_workers))
        limits.append(sum(per_epoch))
    return min(limits)


def run_identity(stream: BlockStream, settings: TrainSettings) -> dict:
    """What must not change across a resume: the settings, the ranks and the data."""
    teachers = [TargetsStore(t).attrs.get("teacher_fingerprint") for t in stream.targets_paths]
    data = {"tokens": TokenStore(stream.tokens_path).fingerprint, "split": stream.split,
            "teachers": teachers, "target_names": stream.target_names, "rows_per_shard": stream.rows_per_shard}
    identity = {"settings": asdict(settings), "world_size": stream.world_size, "data": data}
    return json.loads(json.dumps(identity))  # as run.json holds it (lists, not tuples)


def validation_batches(stream: BlockStream, settings: TrainSettings) -> list[dict[str, torch.Tensor]]:
    """The first eval_batches × batch_size validation rows, as batches of TokenStore.rows tensors (ids
    (B, T); for classification also attention mask and labels): the same every evaluation and every run."""
    rows = TokenStore(stream.tokens_path).rows("validation", 0, settings.eval_batches * settings.batch_size)
    return [dict(zip(rows, parts)) for parts in zip(*(t.split(settings.batch_size) for t in rows.values()))]


@torch.no_grad()
def validation_loss(model, batches: list[dict[str, torch.Tensor]], vocab_size: int, device: torch.device,
                    task=CAUSAL) -> float:
    """Mean cross-entropy on hard labels over every labelled position of `batches` (next token for causal
    LM, the class for classification): comparable between teacher, students and the CE baseline, and the
    val_loss `kdcache evaluate` reports on the same rows. Each batch weighs its rows (a short last batch
    counts for what it holds)."""
    model.eval()
    ce = Objective(vocab_size=vocab_size, task=task)
    total = sum(float(ce(model, {k: v.to(device) for k, v in b.items()})["loss"]) * len(b["input_ids"])
                for b in batches)
    model.train()
    return total / sum(len(b["input_ids"]) for b in batches)


def micro_batches(batch: dict, count: int) -> list[tuple[dict, float]]:
    """`batch` cut along its rows into `count` micro-batches, each with its share of the rows.

    Every loss of the objective is a mean over positions, and every row has the same positions, so
    Σ share_i · loss(micro-batch i) is the loss of the whole batch and so is the sum of their gradients.
    """
    rows = next(iter(batch.values())).shape[0]
    bounds = [rows * i // count for i in range(count + 1)]
    return [({key: value[lo:hi] for key, value in batch.items()}, (hi - lo) / rows)
            for lo, hi in zip(bounds, bounds[1:])]


def train_loop(model, stream: BlockStream, settings: TrainSettings, objective: Objective,
               device: torch.device, desc: str, files: TrainFiles | str | Path | None = None,
               extra_modules: list[torch.nn.Module] = (),
               add_targets: Callable[[dict], dict] | None = None, stateful=()) -> list[dict]:
    """Train until max_steps or epochs is reached. Returns the per-step history (also CSV at files.log).

    files: a TrainFiles, or just the path of the loss CSV.
    add_targets: fills a batch's targets on the fly (the online-KD baseline); None reads them from the stream.
    Under torchrun every rank calls this with its own stream; rank 0 alone writes files.
    stateful: objects with state_dict / load_state_dict that train beside the model on their own (the
    adversarial student's discriminator and its optimizer): saved in checkpoints, restored on resume.
    """
    files = files if isinstance(files, TrainFiles) else TrainFiles(log=files)
    world, main = runtime.world_size(), runtime.is_main()
    if (stream.rank, stream.world_size) != (runtime.rank(), world):
        raise KdcacheError(f"the stream is rank {stream.rank} of {stream.world_size}, the process rank "
                           f"{runtime.rank()} of {world}; build it inside the process group.")
    if settings.batch_size % world:
        raise KdcacheError(f"batch_size {settings.batch_size} is the global batch and must divide evenly "
                           f"over {world} ranks; use a multiple of {world}.")
    if (settings.checkpoint_every or files.resume) and not files.checkpoint_dir:
        raise KdcacheError("checkpoint_every and resume need a checkpoint directory (--checkpoint-dir).")
    local_batch, workers = settings.batch_size // world, settings.num_workers
    accumulation = settings.gradient_accumulation_steps
    if local_batch % accumulation:
        raise KdcacheError(f"gradient_accumulation_steps {accumulation} must divide the {local_batch} blocks each "
                           f"rank takes per step (batch_size {settings.batch_size} over {world} ranks); use a "
                           f"divisor of {local_batch}.")
    precision.check_dtype(settings.dtype, device)
    total = plan_steps(stream, settings, local_batch)
    identity = run_identity(stream, settings)

    torch.manual_seed(settings.seed)
    model.to(device).train()
    trainer = TrainStep(model, extra_modules, objective).to(device)
    params = list(trainer.parameters())
    optimizer = torch.optim.AdamW(param_groups([model, *extra_modules], settings.weight_decay), lr=settings.lr)
    scaler = precision.grad_scaler(settings.dtype, device)  # float16 only
    max_grad_norm = settings.max_grad_norm or math.inf  # inf: measure the norm, never scale it
    history, val_history, step, epoch, done_in_epoch = [], [], 0, 0, 0
    if files.resume:  # before any training: a mismatch costs nothing
        state, saved = checkpoint.load_checkpoint(files.checkpoint_dir)
        checkpoint.check_same_run(saved, identity, total, files.checkpoint_dir)
        model.load_state_dict(state["model"])
        for module, module_state in zip(extra_modules, state["extra"]):
            module.load_state_dict(module_state)
        optimizer.load_state_dict(state["optimizer"])
        for each, each_state in zip(stateful, state.get("stateful", [])):
            each.load_state_dict(each_state)
        history, val_history = state["history"], state["val_history"]
        step, epoch, done_in_epoch = saved["step"], saved["epoch"], saved["batches_in_epoch"]
        checkpoint.set_rng_state(state["rng"])
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        trainer = torch.nn.parallel.DistributedDataParallel(trainer, device_ids=ids)
    val_batches = validation_batches(stream, settings) if settings.eval_every else []
    val_blocks = sum(len(b["input_ids"]) for b in val_batches)  # logged beside val_loss: which blocks it covers

    def save(position: tuple[int, int]) -> None:
        state = {"model": model.state_dict(), "extra": [m.state_dict() for m in extra_modules],
                 "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(),
                 "history": history, "val_history": val_history,
                 "stateful": [each.state_dict() for each in stateful]}
        run = {**identity, "step": step, "epoch": position[0], "batches_in_epoch": position[1]}
        checkpoint.save_checkpoint(files.checkpoint_dir, state, run)
        write_logs()

    def write_logs() -> None:
        if files.log:
            write_history(history, files.log)
        if files.val_log:
            write_history(val_history, files.val_log)

    trackers = Trackers(files.live_dir, files.tensorboard_dir, files.resume) if main else Trackers()
    if workers or settings.reader == "thread":
        loader = make_loader(stream, local_batch, workers, pin_memory=device.type == "cuda")
    else:  # the same batches, read in another process (tensors valid until the next batch is asked for)
        loader = SharedBatches(stream, local_batch)
    tokens_per_step = settings.batch_size * TokenStore(stream.tokens_path).block_size
    bar = progress(total=total, initial=step, desc=desc, unit="step", disable=not main)
    start, first_step = time.perf_counter(), step
    while step < total:
        if done_in_epoch:
            stream.start_epoch(epoch, done_in_epoch, local_batch, workers)
        else:
            stream.set_epoch(epoch)
        epoch_steps = stream.batches_per_epoch(local_batch, workers)  # equal on every rank
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if add_targets is not None:
                batch = add_targets(batch)
            lr = lr_at(step, total, settings.warmup_steps, settings.lr, settings.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            parts = accumulate_gradients(trainer, micro_batches(batch, accumulation), step / total,
                                         precision.autocast(settings.dtype, device), scaler)
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)  # skips the step when the gradients overflowed
                scaler.update()
            else:
                optimizer.step()
            step, done_in_epoch = step + 1, done_in_epoch + 1
            names = list(parts)
            values = runtime.mean_over_ranks(torch.stack([parts[k] for k in names]))
            row = {"step": step, "epoch": epoch, "lr": lr, **dict(zip(names, values.tolist())),
                   "grad_norm": float(grad_norm)}
            history.append(row)
            if main and settings.eval_every and (step % settings.eval_every == 0 or step == total):
                val_history.append({"step": step, "val_loss": validation_loss(
                    model, val_batches, objective.vocab_size, device, objective.task), "val_blocks": val_blocks})
            evaluated = val_history and val_history[-1]["step"] == step
            trackers.log_step(row, val_history[-1] if evaluated else None)
            if main and settings.checkpoint_every and (step % settings.checkpoint_every == 0 or step == total):
                save((epoch + 1, 0) if done_in_epoch == epoch_steps else (epoch, done_in_epoch))
            rate = (step - first_step) * tokens_per_step / (time.perf_counter() - start)
            shown = {"loss": f"{row['loss']:.3f}"}
            if val_history:  # the last validation loss, until the next evaluation replaces it
                shown["val_loss"] = f"{val_history[-1]['val_loss']:.3f}"
            bar.set_postfix(**shown, tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if step >= total or done_in_epoch >= epoch_steps:
                break
        if done_in_epoch >= epoch_steps:
            epoch, done_in_epoch = epoch + 1, 0
    bar.close()
    trackers.close()
    if main:
        write_logs()
    return history


def accumulate_gradients(trainer, micro: list[tuple[dict, float]], progress: float, autocast,
                         scaler) -> dict[str, torch.Tensor]:
    """Backward through each micro-batch's loss weighted by its share of rows; returns the weighted sum
    of the logged parts (float32, detached): the whole batch's values. Under DDP the gradients are
    all-reduced once, after the last micro-batch."""
    totals: dict[str, torch.Tensor] = {}
    for index, (batch, share) in enumerate(micro):
        last = index == len(micro) - 1
        sync = trainer.no_sync() if hasattr(trainer, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with autocast:
                parts = trainer(batch, progress=progress)
            loss = parts["loss"].float() * share
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float() * share
    return totals


def write_history(history: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "step", k))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)

