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
from pipeline.models import (build_bert_classifier, build_bert_mlm, build_gpt2, build_lstm_classifier, check_chunkable,
                             check_fits, check_same_tokenizer, load_model, save_model, special_ids)
from pipeline.training.objective import Objective


def build_student(config: StudentConfig, tokens: TokenStore, seed: int | None = None, teacher_dir: str | None = None):
    """A fresh model of the configured shape (or --init's), refused before training if it cannot
    score the token store, uses another vocabulary, or cannot run the chunked loss."""
    seed = config.seed if seed is None else seed
    classify = tokens.task_name == "classification"
    if config.arch == "lstm" and not classify:
        raise KdcacheError(f"--arch lstm is a sequence classifier; the token store {tokens.path} holds "
                           f"{tokens.task_name} rows. Use --arch transformer, or prepare --task classification.")
    if tokens.task_name != "causal" and (config.mode != "offline" or config.loss_chunk):
        raise KdcacheError(f"a {tokens.task_name} student trains offline (mode offline) with loss_chunk 0; online, "
                           f"mutual and chunked losses are causal-LM only for now.")
    if config.init_from_teacher:
        model = _from_teacher(config, tokens, teacher_dir)
    elif config.init:
        model = load_model(config.init, "student --init model", task=tokens.task)
        check_same_tokenizer(config.init, tokens)
    elif classify:
        build = build_lstm_classifier if config.arch == "lstm" else build_bert_classifier
        model = build(config, tokens.vocab_size, tokens.block_size, tokens.label_names, tokens.meta["pad_id"], seed)
    elif tokens.task_name == "masked":
        model = build_bert_mlm(config, tokens.vocab_size, tokens.block_size, tokens.meta["pad_id"], seed)
    else:
        model = build_gpt2(config, tokens.vocab_size, tokens.block_size, seed, special_ids(tokens.load_tokenizer()))
    check_fits(model, tokens, "student")
    if config.loss_chunk:
        if runtime.launched_world_size() > 1:
            raise KdcacheError("loss_chunk does not run under torchrun/DDP yet; set loss_chunk 0.")
        check_chunkable(model)
    return model


def _from_teacher(config: StudentConfig, tokens: TokenStore, teacher_dir: str | None):
    """The student --init-from-teacher builds from --teacher's layers (student/init.py)."""
    from pipeline.student.init import init_from_teacher
    from pipeline.teacher.load import check_teacher_task, load_teacher

    if config.arch != "transformer" or config.init:
        raise KdcacheError("--init-from-teacher copies the teacher's own layers: it needs --arch transformer "
                           "and no --init.")
    if not teacher_dir:
        raise KdcacheError("--init-from-teacher needs --teacher DIR, the teacher whose layers to copy.")
    teacher, info = load_teacher(teacher_dir)
    check_teacher_task(info, tokens, teacher_dir)
    return init_from_teacher(teacher, config.init_from_teacher)


def distills(config: StudentConfig) -> bool:
    """A schedule counts by its range: alpha that ever drops below 1 distils."""
    return config.schedule("alpha").bounds()[0] < 1.0


def make_objective(config: StudentConfig, tokens: TokenStore, distill: bool, capture_temperature: float = 1.0,
                   **fields) -> Objective:
    """The student's objective from its config; `fields` set the Objective fields a mode decides
    (targets kind, layer pairs, teacher weights...). temperature 0 means the capture temperature."""
    if distill and config.loss == "uld" and (config.temperature not in (0.0, capture_temperature)
                                             or config.temperature_schedule):
        raise KdcacheError(f"loss uld compares sorted probabilities at the capture temperature "
                           f"({capture_temperature:g}), where the cached top-k + tail are exact: set temperature 0 "
                           f"(or {capture_temperature:g}) and no temperature_schedule.")
    # Without KD, alpha and temperature stay out of the loss (and the log).
    schedules = {name: s for name, s in config.schedules().items() if distill or name in ("beta", "gamma")}
    return Objective(vocab_size=tokens.num_outputs, task=tokens.task, alpha=config.alpha if distill else 1.0,
                     cosine=config.cosine,
                     temperature=config.temperature or capture_temperature,
                     capture_temperature=capture_temperature, loss=config.loss, tail_model=config.tail_model,
                     beta=config.beta, hidden_loss=config.hidden_loss, schedules=schedules,
                     loss_chunk=config.loss_chunk, multi_teacher=config.multi_teacher, **fields)


def save_student(model, tokens: TokenStore, out: str | Path, config: StudentConfig, history: list[dict],
                 loss_key: str = "loss", **info) -> None:
    save_model(model, tokens, out, {"config": asdict(config), "tokens_fingerprint": tokens.fingerprint,
                                    "task": tokens.task_name,
                                    "final_loss": history[-1][loss_key], "steps": len(history), **info})
