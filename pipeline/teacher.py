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
from pipeline.train import TrainFiles, resolve_device, save_model, train_loop

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


def materialise_teacher(config: TeacherConfig, tokens_dir: str, out: str,
                        files: TrainFiles | str | None = None) -> dict:
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
                             resolve_device("auto"), "train teacher", files)
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


def trim_top_p(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, top_p: float, min_k: int = 1):
    """Keep per position the shortest prefix of the sorted top-k whose mass reaches top_p (≥ min_k).

    (..., K) ids and log-probs, most probable first → (ids, log-probs, count (...) int64); entries
    beyond the count become id 0 and log-prob −inf. top_p = 1 keeps all K.
    """
    top_k = topk_ids.shape[-1]
    count = torch.full(topk_ids.shape[:-1], top_k, dtype=torch.long, device=topk_ids.device)
    if top_p >= 1.0:
        return topk_ids, topk_logprobs, count
    below = topk_logprobs.exp().cumsum(dim=-1) < top_p  # prefixes still short of p
    count = (below.sum(dim=-1) + 1).clamp(min=min_k, max=top_k)
    absent = torch.arange(top_k, device=count.device) >= count.unsqueeze(-1)
    return topk_ids.masked_fill(absent, 0), topk_logprobs.masked_fill(absent, float("-inf")), count


@torch.inference_mode()
def teacher_targets(model, input_ids: torch.Tensor, vocab_size: int, top_k: int,
                    temperature: float = 1.0, layers=(), num_samples: int = 0,
                    generator: torch.Generator | None = None, top_p: float = 1.0,
                    min_k: int = 1) -> dict[str, torch.Tensor]:
    """What the teacher contributes for a batch (B, T) of token ids.

    Returns topk_ids (B, T, K) int64 sorted by probability, topk_logprobs (B, T, K) float32,
    tail_logmass (B, T) float32 = log(1 − Σ top-k p) (−inf when nothing is left), and
    hidden_layer_{l} (B, T, D) for each requested layer. Padded vocabulary rows are cut off first.
    With num_samples > 0 it also returns sampled_ids and sampled_counts (B, T, num_samples) int64:
    `sample_targets` drawn from the teacher at `temperature` (random-sampling KD).
    With top_p < 1 it keeps per position the shortest prefix of the top-k whose mass reaches top_p
    (at least min_k entries) and also returns topk_count (B, T) int64: entries beyond it are id 0 and
    log-prob −inf, and tail_logmass is the mass of everything not kept.
    """
    out = model(input_ids=input_ids, output_hidden_states=bool(layers))
    logprobs = torch.log_softmax(out.logits[..., :vocab_size].float() / temperature, dim=-1)  # (B, T, V)
    result = {}
    if top_k > 0:  # top_k = 0: sampled targets only
        topk_logprobs, topk_ids = logprobs.topk(top_k, dim=-1, sorted=True)
        topk_ids, topk_logprobs, count = trim_top_p(topk_ids, topk_logprobs, top_p, min_k)
        kept = torch.logsumexp(topk_logprobs, dim=-1).clamp(max=0.0)
        tail = torch.log(-torch.expm1(kept))  # log(1 - e^kept), accurate near 0
        # Nothing is left where every id is kept: don't keep rounding residue.
        tail = tail.masked_fill(count >= vocab_size, float("-inf"))
        result = {fmt.TOPK_IDS: topk_ids, fmt.TOPK_LOGPROBS: topk_logprobs, fmt.TAIL_LOGMASS: tail}
        if top_p < 1.0:
            result[fmt.TOPK_COUNT] = count
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
                       files: TrainFiles | str | None = None) -> dict:
    """The online-KD baseline: train a student with the teacher in the loop (top_k 0: full vocabulary)."""
    from pipeline.distill import run_student

    vocab = TokenStore(tokens_dir).vocab_size
    online = OnlineTargets(teacher_dir, vocab, top_k or vocab, 1.0, [], resolve_device(config.device))
    return run_student(config, tokens_dir, out, None, files, add_targets=online)


# --- Deep mutual learning (Zhang et al., CVPR 2018): two students teach each other ------------------


def mutual_peer_dir(out: str | Path) -> Path:
    """Where `run_mutual_students` saves the second student: OUT's sibling OUT-peer."""
    out = Path(out)
    return out.with_name(out.name + "-peer")


def peer_targets(peer, input_ids: torch.Tensor, vocab_size: int) -> dict:
    """The peer's current distribution as full-vocabulary top-k targets (τ = 1, no gradient)."""
    targets = teacher_targets(peer, input_ids, vocab_size, vocab_size)
    return {k: v.clone() for k, v in targets.items()}  # out of inference mode


class MutualObjective:
    """Both students' losses for one batch: each is `objective` with the other as its teacher.

    Called with the pair (ModuleList of two students) as the model. Each KD term compares a student with
    its peer's detached distribution of the same step, before either is updated (a simultaneous update;
    the paper alternates). The total is the sum of the two losses; their graphs are disjoint, so each
    student's gradient is that of its own loss. Logged: the first student's parts (its own loss as
    student_loss), peer_* for the other, and loss = student_loss + peer_loss.
    """

    def __init__(self, objective: Objective):
        self.objective = objective

    def __call__(self, pair, batch: dict, progress: float = 0.0) -> dict[str, torch.Tensor]:
        first, second = pair
        vocab = self.objective.vocab_size
        from_second = peer_targets(second, batch["input_ids"], vocab)
        from_first = peer_targets(first, batch["input_ids"], vocab)
        parts = self.objective(first, {**batch, **from_second}, progress)
        peer = self.objective(second, {**batch, **from_first}, progress)
        parts.update({f"peer_{name}": value for name, value in peer.items()})
        parts["student_loss"] = parts["loss"]
        parts["loss"] = parts["loss"] + peer["loss"]  # what the optimizer steps on
        return parts


def run_mutual_students(config, tokens_dir: str, out: str, files: TrainFiles | str | None = None) -> dict:
    """Train two students (seeds s and s + 1) by deep mutual learning; save them to OUT and OUT-peer.

    The baseline without any teacher: each student learns from the hard labels (α) and from the other
    student's current full distribution (1 − α, at the KD temperature and --loss). Both see the same batches.
    """
    from dataclasses import replace

    from pipeline.distill import build_student
    from pipeline.objective import check_chunkable

    if config.init:
        raise KdcacheError("--mutual trains two differently initialised students; --init would start both from "
                           "the same weights (and keep them equal). Leave --init out.")
    if config.beta or config.beta_schedule:
        raise KdcacheError("--mutual has no teacher hidden states to match; set beta 0 (and no beta_schedule).")
    tokens = TokenStore(tokens_dir)
    configs = [config, replace(config, seed=config.seed + 1)]
    pair = torch.nn.ModuleList([build_student(c, tokens.vocab_size, tokens.block_size) for c in configs])
    for student in pair:
        check_model_fits(student, tokens.vocab_size, tokens.block_size, "student")
        if config.loss_chunk:
            check_chunkable(student)
    objective = Objective(vocab_size=tokens.vocab_size, alpha=config.alpha, temperature=config.temperature,
                          loss=config.loss, schedules=config.schedules(), loss_chunk=config.loss_chunk)
    stream = BlockStream(tokens_dir, "train", shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    history = train_loop(pair, stream, config, MutualObjective(objective), resolve_device(config.device),
                         f"mutual {Path(out).name}", files)
    places = [Path(out), mutual_peer_dir(out)]
    for student, student_config, place, peer_place, key in zip(pair, configs, places, places[::-1],
                                                                ("student_loss", "peer_loss")):
        save_model(student, tokens, place, {"config": asdict(student_config), "mutual_peer": str(peer_place),
                                            "tokens_fingerprint": tokens.fingerprint,
                                            "final_loss": history[-1][key], "steps": len(history)})
    return history[-1]
