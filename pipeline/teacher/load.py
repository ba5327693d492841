"""A teacher directory: a saved model plus kdcache's info file (source, fingerprint, tokens).

`kdcache teacher` writes one (training/teacher.py trains the default teacher); the capture and the
online baseline load it. Nothing here trains: teacher/ never imports training/ or student/.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline import runtime
from pipeline.errors import KdcacheError
from pipeline.models import (check_fits, check_same_tokenizer, fingerprint_model_dir, gguf_file, load_model,
                             model_fingerprint, num_layers, read_info, save_model, set_pad_id, write_info)
from pipeline.tasks import get_task


def load_pretrained(name_or_path: str, tokens, dtype: str = "float32", new_head: bool = False):
    """The teacher --model: a path, hub id or GGUF file (or a directory holding one; dequantised), checked
    against the token store before any work.

    Its own tokenizer (when saved beside it) must be the token store's, id for id: a teacher reading
    ids from another tokenizer gives well-formed but meaningless targets. new_head (classification, to
    be fine-tuned): a fresh head for the token store's labels replaces the model's own, and pools
    by the store's padding id (set_pad_id).
    """
    check_same_tokenizer(name_or_path, tokens, "the teacher --model",
                         f"prepare the tokens with the teacher's tokenizer (`kdcache prepare --tokenizer "
                         f"{name_or_path}`), then re-run teacher and cache")
    labels = tokens.label_names if new_head and tokens.task_name == "classification" else None
    model = load_model(name_or_path, "teacher --model", task=tokens.task, new_head_labels=labels)
    check_fits(model, tokens, "teacher")
    if tokens.task_name == "classification":
        set_pad_id(model, tokens.meta["pad_id"], new_head, "teacher")
    return model.to(runtime.torch_dtype(dtype))  # saved so: bfloat16 halves the teacher on disk


def save_teacher(model, tokens, out: str | Path, source: str, config, final_loss: float | None) -> dict:
    """Save the teacher with its info file (written once, after the weights it fingerprints)."""
    save_model(model, tokens, out, None)
    info = {"source": source, "fingerprint": fingerprint_model_dir(out), "num_layers": num_layers(model),
            "vocab_size": tokens.vocab_size, "tokens_fingerprint": tokens.fingerprint,
            "final_train_loss": final_loss, "config": asdict(config), "task": tokens.task_name}
    gguf = gguf_file(source) if getattr(config, "model", "") else None
    if gguf:  # the plain weights saved here were dequantised from this file
        info["gguf"] = {"file": str(gguf.resolve()), "sha256": model_fingerprint(str(gguf))["sha256"],
                        "architecture": model.config.model_type, "saved_dtype": str(model.dtype).removeprefix("torch.")}
    write_info(out, info)
    return info


def load_teacher(teacher_dir: str | Path):
    """(model, info) of a teacher directory written by `kdcache teacher`, or of a student directory
    (self-distillation: a student teaches the next generation; its fingerprint is computed here)."""
    info = read_info(teacher_dir, "teacher")
    if "fingerprint" not in info:
        info = {**info, "fingerprint": fingerprint_model_dir(teacher_dir)}
    return load_model(str(teacher_dir), "teacher", task=get_task(info.get("task", "causal"))), info


def check_teacher_task(info: dict, tokens, teacher_dir) -> None:
    """Refuse a teacher of another task than the token store's (its head cannot give these targets)."""
    task = info.get("task", "causal")
    if task != tokens.task_name:
        raise KdcacheError(f"teacher {teacher_dir} is a {task} model but the token store {tokens.path} holds "
                           f"{tokens.task_name} rows; re-run `kdcache teacher` on these tokens.")


def check_teacher_tokenizer(teacher_dir: str | Path, tokens) -> None:
    """Refuse a token store whose tokenizer is not the one saved beside the teacher (id for id)."""
    from transformers import AutoTokenizer

    if not (Path(teacher_dir) / "tokenizer_config.json").exists():
        return  # no tokenizer saved beside the model: check_model_fits's size check is all we can do
    theirs = AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    if theirs != tokens.load_tokenizer().get_vocab():
        raise KdcacheError(f"the teacher's tokenizer ({teacher_dir}, {len(theirs)} ids) differs from the token "
                           f"store's ({tokens.name}, {tokens.vocab_size} ids); use a token store prepared with "
                           f"the teacher's tokenizer (prepare --tokenizer {teacher_dir}) or its own teacher.")


def check_layers(model, layers) -> None:
    available = num_layers(model)
    bad = [layer for layer in layers if not 0 <= layer <= available]
    if bad:
        raise KdcacheError(f"teacher has hidden-state layers 0..{available} (0 = embeddings); "
                           f"--layer {bad} does not exist.")
