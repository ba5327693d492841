"""The online-KD baseline: the teacher runs in the training loop instead of being read from a cache.

What offline KD is measured against: the same objective, with targets computed per batch by
`teacher.signals.teacher_targets` (top-k + tail, or the full vocabulary with online_top_k 0).
"""

from __future__ import annotations

from pathlib import Path

from pipeline import runtime
from pipeline.config import StudentConfig
from pipeline.data.tokens import TokenStore
from pipeline.models import check_room
from pipeline.student.setup import build_student, distills, make_objective, save_student
from pipeline.teacher.load import load_teacher
from pipeline.teacher.signals import teacher_targets
from pipeline.training.loader import BlockStream
from pipeline.training.loop import TrainFiles, train_loop

ONLINE_CAPTURE_TEMPERATURE = 1.0  # the teacher's own distribution; the train temperature acts on it


class OnlineTargets:
    """Adds teacher targets to each batch inside the training loop."""

    def __init__(self, teacher_dir: str, vocab_size: int, top_k: int, capture_temperature: float, layers, device):
        self.model, _ = load_teacher(teacher_dir)
        self.model.to(device).eval()
        self.vocab_size, self.top_k, self.layers = vocab_size, top_k, layers
        self.capture_temperature = capture_temperature

    def __call__(self, batch: dict) -> dict:
        targets = teacher_targets(self.model, batch["input_ids"], self.vocab_size, self.top_k,
                                  self.capture_temperature, self.layers)
        return {**batch, **{k: v.clone() for k, v in targets.items()}}  # out of inference mode


def run_online(config: StudentConfig, tokens_dir: str, out: str, teacher_dir: str,
               files: TrainFiles | str | None = None) -> dict:
    """Train a student with the teacher in the loop (online_top_k 0: the full vocabulary)."""
    tokens = TokenStore(tokens_dir)
    model = build_student(config, tokens)
    check_room([model], out)
    device = runtime.resolve_device(config.device)
    online = OnlineTargets(teacher_dir, tokens.vocab_size, config.online_top_k or tokens.vocab_size,
                           ONLINE_CAPTURE_TEMPERATURE, [], device)
    objective = make_objective(config, tokens, distills(config), ONLINE_CAPTURE_TEMPERATURE)
    stream = BlockStream(tokens_dir, "train", shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    history = train_loop(model, stream, config, objective, device, f"student {Path(out).name}", files,
                         add_targets=online)
    save_student(model, tokens, out, config, history, online_teacher=str(teacher_dir))
    return history[-1]
