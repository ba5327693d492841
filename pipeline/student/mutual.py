"""Deep mutual learning (Zhang et al., CVPR 2018): two students teach each other, no teacher at all.

A baseline for offline KD: each student's targets are its peer's current full distribution.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from pipeline import runtime
from pipeline.config import StudentConfig
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.models import check_room
from pipeline.student.setup import build_student, make_objective, save_student
from pipeline.teacher.signals import teacher_targets
from pipeline.training.loader import BlockStream
from pipeline.training.loop import TrainFiles, train_loop
from pipeline.training.objective import Objective


def mutual_peer_dir(out: str | Path) -> Path:
    """Where `run_mutual` saves the second student: OUT's sibling OUT-peer."""
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


def run_mutual(config: StudentConfig, tokens_dir: str, out: str, files: TrainFiles | str | None = None) -> dict:
    """Train two students (seeds s and s + 1) by deep mutual learning; save them to OUT and OUT-peer.

    The baseline without any teacher: each student learns from the hard labels (α) and from the other
    student's current full distribution (1 − α, at the KD temperature and --loss). Both see the same batches.
    """
    if config.init:
        raise KdcacheError("mode mutual trains two differently initialised students; --init would start both "
                           "from the same weights (and keep them equal). Leave --init out.")
    if config.beta or config.beta_schedule:
        raise KdcacheError("mode mutual has no teacher hidden states to match; set beta 0 (and no beta_schedule).")
    tokens = TokenStore(tokens_dir)
    seeds = (config.seed, config.seed + 1)
    pair = torch.nn.ModuleList([build_student(config, tokens, seed) for seed in seeds])
    check_room(pair, out)  # both are saved (OUT and OUT-peer, on the same disk)
    objective = make_objective(config, tokens, distill=True)
    stream = BlockStream(tokens_dir, "train", shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    history = train_loop(pair, stream, config, MutualObjective(objective), runtime.resolve_device(config.device),
                         f"mutual {Path(out).name}", files)
    places = [Path(out), mutual_peer_dir(out)]
    for student, seed, place, peer_place, key in zip(pair, seeds, places, places[::-1], ("student_loss", "peer_loss")):
        save_student(student, tokens, place, replace(config, seed=seed), history, key, mutual_peer=str(peer_place))
    return history[-1]
