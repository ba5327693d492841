"""The training loop shared by the default teacher (CE only) and the students (see objective.py)."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.config import TrainSettings
from pipeline.loader import BlockStream, make_loader
from pipeline.progress import progress
from pipeline.tokens import TokenStore


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10% of it at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def train_loop(model, stream: BlockStream, settings: TrainSettings, objective: Objective,
               device: torch.device, desc: str, log_path: str | Path | None = None,
               extra_modules: list[torch.nn.Module] = (),
               add_targets: Callable[[dict], dict] | None = None) -> list[dict]:
    """Train until max_steps or epochs is reached. Returns the per-step history (also CSV at log_path).

    add_targets: fills a batch's targets on the fly (the online-KD baseline); None reads them from the stream.
    """
    torch.manual_seed(settings.seed)
    model.to(device).train()
    params = [p for m in (model, *extra_modules) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    loader = make_loader(stream, settings.batch_size, settings.num_workers)
    steps_per_epoch = math.ceil(stream.num_rows / stream.world_size / settings.batch_size)
    total = min(s for s in (settings.max_steps, settings.epochs * steps_per_epoch) if s > 0)
    tokens_per_step = settings.batch_size * TokenStore(stream.tokens_path).block_size
    history, step, epoch = [], 0, 0
    bar = progress(total=total, desc=desc, unit="step")
    start = time.perf_counter()
    while step < total:
        stream.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if add_targets is not None:
                batch = add_targets(batch)
            lr = lr_at(step, total, settings.warmup_steps, settings.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts = objective(model, batch, progress=step / total)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            row = {"step": step, "epoch": epoch, "lr": lr, **{k: float(v.detach()) for k, v in parts.items()}}
            history.append(row)
            rate = step * tokens_per_step / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if step >= total:
                break
        epoch += 1
    bar.close()
    if log_path:
        write_history(history, log_path)
    return history


def write_history(history: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "step", k))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def save_model(model, tokens: TokenStore, out: str | Path, info: dict) -> None:
    """save_pretrained (safetensors) + the tokenizer + kdcache.json, so from_pretrained(out) works."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    tokens.load_tokenizer().save_pretrained(out)
    (out / "kdcache.json").write_text(json.dumps(info, indent=2, default=str))
