"""What every way of training a student shares: build and check the model, its objective, its saving.

offline.py, online.py and mutual.py differ only in where the teacher's targets come from.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline import runtime
from pipeline.config import StudentConfig
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.models import (build_gpt2, check_chunkable, check_model_fits, check_same_tokenizer, load_model,
                             save_model, special_ids)
from pipeline.training.objective import Objective


def build_student(config: StudentConfig, tokens: TokenStore, seed: int | None = None):
    """A fresh model of the configured shape (or --init's), refused before training if it cannot
    score the token store, uses another vocabulary, or cannot run the chunked loss."""
    if config.init:
        model = load_model(config.init, "student --init model")
        check_same_tokenizer(config.init, tokens)
    else:
        model = build_gpt2(config, tokens.vocab_size, tokens.block_size, config.seed if seed is None else seed,
                           special_ids(tokens.load_tokenizer()))
    check_model_fits(model, tokens.vocab_size, tokens.block_size, "student")
    if config.loss_chunk:
        if runtime.launched_world_size() > 1:
            raise KdcacheError("loss_chunk does not run under torchrun/DDP yet; set loss_chunk 0.")
        check_chunkable(model)
    return model


def distills(config: StudentConfig) -> bool:
    """A schedule counts by its range: alpha that ever drops below 1 distils."""
    return config.schedule("alpha").bounds()[0] < 1.0


def make_objective(config: StudentConfig, tokens: TokenStore, distill: bool, capture_temperature: float = 1.0,
                   **fields) -> Objective:
    """The student's objective from its config; `fields` set the Objective fields a mode decides
    (targets kind, layer pairs, teacher weights...). temperature 0 means the capture temperature."""
    # Without KD, alpha and temperature stay out of the loss (and the log).
    schedules = {name: s for name, s in config.schedules().items() if distill or name in ("beta", "gamma")}
    return Objective(vocab_size=tokens.vocab_size, alpha=config.alpha if distill else 1.0,
                     temperature=config.temperature or capture_temperature,
                     capture_temperature=capture_temperature, loss=config.loss, tail_model=config.tail_model,
                     beta=config.beta, schedules=schedules, loss_chunk=config.loss_chunk,
                     multi_teacher=config.multi_teacher, **fields)


def save_student(model, tokens: TokenStore, out: str | Path, config: StudentConfig, history: list[dict],
                 loss_key: str = "loss", **info) -> None:
    save_model(model, tokens, out, {"config": asdict(config), "tokens_fingerprint": tokens.fingerprint,
                                    "final_loss": history[-1][loss_key], "steps": len(history), **info})
