"""The training loop, shared by the default teacher (CE only) and the students (CE + KD + hidden).

Loss = α·CE(hard labels) + (1−α)·τ²·KD + β·hidden MSE (DESIGN §4). Shapes: B batch, T block, V vocab,
K top-k, D hidden width. Logits are cut to the token store's V, so padded output layers are fine.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from pipeline.progress import progress

from pipeline import losses
from pipeline.config import StudentConfig, TrainSettings
from pipeline.errors import KdcacheError
from pipeline.loader import BlockStream, make_loader
from pipeline.student import build_gpt2, check_model_fits, hidden_size, load_causal_lm, num_layers
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore
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


@dataclass
class Objective:
    """Computes the mixed loss for one batch. alpha = 1 and no targets: plain cross-entropy."""

    vocab_size: int
    alpha: float = 1.0
    temperature: float = 1.0
    capture_temperature: float = 1.0
    loss: str = "tail_kl"
    kd_targets: str = "topk"  # or "sampled": the distilled term reads that kind of cached target
    beta: float = 0.0
    layer_pairs: list[tuple[int, int]] = field(default_factory=list)  # (student layer, teacher layer)
    projections: torch.nn.ModuleDict | None = None  # str(student layer) -> Linear(D_s, D_t)

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        input_ids = batch["input_ids"]  # (B, T)
        out = model(input_ids=input_ids, output_hidden_states=bool(self.beta and self.layer_pairs))
        logits = out.logits[..., : self.vocab_size]  # (B, T, V)
        V = self.vocab_size
        flat = logits.reshape(-1, V)  # (B*T, V)
        # Position t predicts token t+1: the last position of a block has no hard label.
        labels = torch.roll(input_ids, -1, dims=1).flatten()
        ce_mask = torch.ones_like(input_ids, dtype=torch.bool)
        ce_mask[:, -1] = False
        ce_mask = ce_mask.flatten()
        parts = {}
        if self.alpha >= 1.0:
            parts["ce"] = losses.cross_entropy(flat, labels, ce_mask)
        elif self.kd_targets == "sampled":
            parts["ce"] = losses.cross_entropy(flat, labels, ce_mask)
            parts["kd"] = losses.sampled_kd(flat, batch[fmt.SAMPLED_IDS].flatten(0, 1),
                                            batch[fmt.SAMPLED_COUNTS].flatten(0, 1), self.temperature)
        else:
            ids = batch[fmt.TOPK_IDS].flatten(0, 1)  # (B*T, K)
            logprobs = batch[fmt.TOPK_LOGPROBS].flatten(0, 1)
            if self.loss == "tail_kl":
                parts["ce"], parts["kd"] = losses.ce_and_tail_kl(
                    flat, labels, ce_mask, ids, logprobs, batch[fmt.TAIL_LOGMASS].flatten(),
                    self.temperature, self.capture_temperature)
            else:
                parts["ce"] = losses.cross_entropy(flat, labels, ce_mask)
                parts["kd"] = losses.KD_LOSS_FUNCTIONS[self.loss](
                    flat, ids, logprobs, batch[fmt.TAIL_LOGMASS].flatten(), self.temperature,
                    self.capture_temperature)
        loss = self.alpha * parts["ce"]
        if "kd" in parts:
            loss = loss + (1 - self.alpha) * self.temperature**2 * parts["kd"]
        if self.beta and self.layer_pairs:
            hidden = []
            for s, t in self.layer_pairs:
                projected = self.projections[str(s)](out.hidden_states[s])  # (B, T, D_t)
                hidden.append(losses.hidden_mse(projected.flatten(0, 1), batch[fmt.hidden_array(t)].flatten(0, 1)))
            parts["hidden"] = torch.stack(hidden).mean()
            loss = loss + self.beta * parts["hidden"]
        parts["loss"] = loss
        return parts


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
            parts = objective(model, batch)
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


def uniform_layer_map(captured: list[int], teacher_layers: int, student_layers: int) -> list[tuple[int, int]]:
    """Map each captured teacher layer t to student layer round(t · L_s / L_t) (0 stays 0)."""
    return [(round(t * student_layers / teacher_layers), t) for t in captured]


def build_student(config: StudentConfig, vocab_size: int, block_size: int):
    if config.init:
        model = load_causal_lm(config.init, "student --init model")
    else:
        model = build_gpt2(config, vocab_size, block_size, config.seed)
    return model


def check_same_tokenizer(model_dir: str, tokens: TokenStore) -> None:
    """A student brought with --init must share the teacher's vocabulary, id for id."""
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    except Exception:  # no tokenizer saved beside the model: the size check is all we can do
        return
    if theirs != tokens.load_tokenizer().get_vocab():
        raise KdcacheError(f"the student's vocabulary ({model_dir}, {len(theirs)} ids) differs from the "
                           f"teacher's ({tokens.vocab_size} ids); the student must use the teacher's tokenizer.")


def resolve_kd_targets(requested: str, store: TargetsStore) -> str:
    """"topk" or "sampled": what the KD term reads, refusing a kind the store does not hold."""
    has = {"topk": store.top_k > 0, "sampled": store.samples > 0}
    kind = requested if requested != "auto" else ("topk" if has["topk"] else "sampled")
    if not has[kind]:
        raise KdcacheError(f"{store.path} holds no {kind} targets (top_k={store.top_k}, samples="
                           f"{store.samples}); use --kd-targets {'sampled' if kind == 'topk' else 'topk'} "
                           f"or re-run cache with them.")
    return kind


def run_student(config: StudentConfig, tokens_dir: str, out: str, targets: str | None = None,
                log_path: str | None = None, add_targets=None) -> dict:
    """Train one student from a token store (+ a targets store) and save it with save_pretrained.

    Everything that can be refused (fingerprints, vocabulary, layers) is checked before training.
    """
    tokens = TokenStore(tokens_dir)
    distill = config.alpha < 1.0 and (targets is not None or add_targets is not None)
    model = build_student(config, tokens.vocab_size, tokens.block_size)
    check_model_fits(model, tokens.vocab_size, tokens.block_size, "student")
    if config.init:
        check_same_tokenizer(config.init, tokens)
    layer_pairs, store, kind = [], None, "topk"
    capture_temperature = 1.0  # the online baseline computes its targets at τ = 1
    if targets is not None:
        store = TargetsStore(targets)
        pairs = [tuple(int(x) for x in p.split(":")) for p in config.layer_map]
        if config.beta and not pairs:
            pairs = uniform_layer_map(store.layers, int(store.attrs["teacher_num_layers"]), num_layers(model))
        store.check_compatible(tokens, "train", tokens.vocab_size, [t for _, t in pairs])
        bad_student = [s for s, _ in pairs if s > num_layers(model)]
        if bad_student:
            raise KdcacheError(f"student layers {bad_student} in layer_map do not exist (student has "
                               f"{num_layers(model)}).")
        layer_pairs = pairs if config.beta else []
        capture_temperature = store.temperature
        kind = resolve_kd_targets(config.kd_targets, store)
    projections = torch.nn.ModuleDict({
        str(s): torch.nn.Linear(hidden_size(model), int(store.attrs["hidden_size"]), bias=False)
        for s, _ in layer_pairs})
    objective = Objective(vocab_size=tokens.vocab_size, alpha=config.alpha if distill else 1.0,
                          temperature=config.temperature, capture_temperature=capture_temperature,
                          loss=config.loss, kd_targets=kind, beta=config.beta, layer_pairs=layer_pairs,
                          projections=projections)
    names = None
    if store is not None:
        kd_names = store.sampled_names() if kind == "sampled" else store.topk_names()
        names = (kd_names if distill else []) + \
                [fmt.hidden_array(t) for _, t in layer_pairs]
    stream = BlockStream(tokens_dir, "train", targets if names else None, names,
                         shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    device = resolve_device(config.device)
    projections.to(device)
    history = train_loop(model, stream, config, objective, device, f"student {Path(out).name}",
                         log_path, [projections], add_targets)
    save_model(model, tokens, out, {"config": asdict(config), "targets": targets,
                                    "tokens_fingerprint": tokens.fingerprint,
                                    "final_loss": history[-1]["loss"], "steps": len(history)})
    return history[-1]


def save_model(model, tokens: TokenStore, out: str | Path, info: dict) -> None:
    """save_pretrained (safetensors) + the tokenizer + kdcache.json, so from_pretrained(out) works."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    tokens.load_tokenizer().save_pretrained(out)
    (out / "kdcache.json").write_text(json.dumps(info, indent=2, default=str))
