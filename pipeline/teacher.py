"""The teacher: load a pretrained causal LM or train the small default one; turn its outputs into targets.

`teacher_targets` is the single definition of what a teacher contributes per position; the cache
stage stores its output, and the online-KD baseline computes it inside the training loop.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.config import TeacherConfig
from pipeline.errors import KdcacheError
from pipeline.loader import BlockStream
from pipeline.student import build_gpt2, check_model_fits, load_causal_lm, num_layers, padded
from pipeline.targets import format as fmt
from pipeline.tokens import TokenStore
from pipeline.objective import Objective
from pipeline.train import resolve_device, save_model, train_loop

INFO_FILE = "kdcache.json"


def fingerprint_model_dir(path: str | Path) -> str:
    """Hash of the config and every weight file: identifies the teacher a store was captured from."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            h.update(f.name.encode())
            with f.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def materialise_teacher(config: TeacherConfig, tokens_dir: str, out: str, log_path: str | None = None) -> dict:
    """Load `config.model` or train the default teacher; save it to `out` with its fingerprint."""
    tokens = TokenStore(tokens_dir)
    if config.model:
        model = load_causal_lm(config.model, "teacher --model")
        check_model_fits(model, tokens.vocab_size, tokens.block_size, "teacher")
        source, final_loss = config.model, None
    else:
        model = build_gpt2(config, padded(tokens.vocab_size, config.vocab_multiple), tokens.block_size,
                           config.seed)
        stream = BlockStream(tokens_dir, "train", shuffle_buffer=config.shuffle_buffer, seed=config.seed)
        history = train_loop(model, stream, config, Objective(vocab_size=tokens.vocab_size),
                             resolve_device("auto"), "train teacher", log_path)
        if not distributed.is_main():  # torchrun: rank 0 alone saves and fingerprints the teacher
            return {"source": "default", "rank": distributed.rank()}
        source, final_loss = "default", history[-1]["loss"]
    save_model(model, tokens, out, {})
    info = {"source": source, "fingerprint": fingerprint_model_dir(out), "num_layers": num_layers(model),
            "vocab_size": tokens.vocab_size, "tokens_fingerprint": tokens.fingerprint,
            "final_train_loss": final_loss, "config": asdict(config)}
    (Path(out) / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def load_teacher(teacher_dir: str | Path):
    """(model, info) of a teacher directory written by `materialise_teacher`."""
    info_path = Path(teacher_dir) / INFO_FILE
    if not info_path.exists():
        raise KdcacheError(f"{teacher_dir} is not a teacher directory (no {INFO_FILE}); "
                           f"run `kdcache teacher --out {teacher_dir}` first.")
    info = json.loads(info_path.read_text())
    return load_causal_lm(str(teacher_dir), "teacher"), info


def check_layers(model, layers) -> None:
    available = num_layers(model)
    bad = [layer for layer in layers if not 0 <= layer <= available]
    if bad:
        raise KdcacheError(f"teacher has hidden-state layers 0..{available} (0 = embeddings); "
                           f"--layer {bad} does not exist.")


# Keys of the random-sampling KD targets (Anshumann et al., ACL 2025) in `teacher_targets`' result.


def sample_targets(logprobs: torch.Tensor, num_samples: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `num_samples` ids per position from the teacher and store them as unique ids + counts.

    logprobs (B, T, V) float32 (normalised log-probs) → sampled_ids (B, T, N) int64 and
    sampled_counts (B, T, N) int64, N = num_samples. Draws are i.i.d. with replacement from
    p = exp(logprobs); each position's distinct ids come first in increasing id order, then padding
    (id 0, count 0), so the counts of a position sum to N. `generator` must live on logprobs' device.
    Vectorised: sort the draws, mark where each run of equal ids starts, scatter-add the run lengths.
    """
    if num_samples < 1:
        raise KdcacheError(f"num_samples must be at least 1, got {num_samples}.")
    *lead, vocab = logprobs.shape
    probs = logprobs.float().reshape(-1, vocab).exp()
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # (P, N)
    draws = draws.sort(dim=-1).values
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = starts.long().cumsum(dim=-1) - 1  # index of each draw's run among the distinct ids
    # Every draw of a run writes the same id to its slot, so duplicate indices are harmless here.
    ids = torch.zeros_like(draws).scatter_(-1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    shape = (*lead, num_samples)
    return ids.reshape(shape), counts.reshape(shape)


@torch.inference_mode()
def teacher_targets(model, input_ids: torch.Tensor, vocab_size: int, top_k: int,
                    temperature: float = 1.0, layers=(), num_samples: int = 0,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """What the teacher contributes for a batch (B, T) of token ids.

    Returns topk_ids (B, T, K) int64 sorted by probability, topk_logprobs (B, T, K) float32,
    tail_logmass (B, T) float32 = log(1 − Σ top-k p) (−inf when nothing is left), and
    hidden_layer_{l} (B, T, D) for each requested layer. Padded vocabulary rows are cut off first.
    With num_samples > 0 it also returns sampled_ids and sampled_counts (B, T, num_samples) int64:
    `sample_targets` drawn from the teacher at `temperature` (random-sampling KD).
    """
    out = model(input_ids=input_ids, output_hidden_states=bool(layers))
    logprobs = torch.log_softmax(out.logits[..., :vocab_size].float() / temperature, dim=-1)  # (B, T, V)
    result = {}
    if top_k > 0:  # top_k = 0: sampled targets only
        topk_logprobs, topk_ids = logprobs.topk(top_k, dim=-1, sorted=True)
        kept = torch.logsumexp(topk_logprobs, dim=-1).clamp(max=0.0)
        tail = torch.log(-torch.expm1(kept))  # log(1 - e^kept), accurate near 0
        if top_k >= vocab_size:
            tail = torch.full_like(tail, float("-inf"))  # nothing is left; don't keep rounding residue
        result = {fmt.TOPK_IDS: topk_ids, fmt.TOPK_LOGPROBS: topk_logprobs, fmt.TAIL_LOGMASS: tail}
    for layer in layers:
        result[fmt.hidden_array(layer)] = out.hidden_states[layer].float()
    if num_samples > 0:
        result[fmt.SAMPLED_IDS], result[fmt.SAMPLED_COUNTS] = sample_targets(logprobs, num_samples, generator)
    return result


class OnlineTargets:
    """Adds teacher targets to each batch inside the training loop: the online-KD baseline."""

    def __init__(self, teacher_dir: str, vocab_size: int, top_k: int, temperature: float, layers, device):
        self.model, _ = load_teacher(teacher_dir)
        self.model.to(device).eval()
        self.vocab_size, self.top_k, self.temperature, self.layers = vocab_size, top_k, temperature, layers

    def __call__(self, batch: dict) -> dict:
        targets = teacher_targets(self.model, batch["input_ids"], self.vocab_size, self.top_k,
                                  self.temperature, self.layers)
        return {**batch, **{k: v.clone() for k, v in targets.items()}}  # out of inference mode


def run_online_student(config, tokens_dir: str, out: str, teacher_dir: str, top_k: int = 32,
                       log_path: str | None = None) -> dict:
    """The online-KD baseline: train a student with the teacher in the loop (top_k 0: full vocabulary)."""
    from pipeline.distill import run_student

    vocab = TokenStore(tokens_dir).vocab_size
    online = OnlineTargets(teacher_dir, vocab, top_k or vocab, 1.0, [], resolve_device(config.device))
    return run_student(config, tokens_dir, out, None, log_path, add_targets=online)
