"""`kdcache teacher`: load a pretrained teacher, or train the small default one on the token store.

The default teacher is the student architecture at teacher size, trained on hard labels with the
same loop as the students: GPT-2 for causal LM; for masked LM a BERT trained on the token store's
fixed masks (every view of the train split); for classification a BERT classifier trained on the
labels, after `mlm_steps` of masked-LM pre-training on the train split's text (a BERT is an encoder
pretrained before it is fine-tuned). `finetune` trains a loaded --model the same way (a pretrained
encoder given a new head for the store's labels). Saving and fingerprinting belong to teacher/load.py.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from pipeline import runtime
from pipeline.config import TeacherConfig
from pipeline.data.examples import masked_lm_store
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.location import Location
from pipeline.models import build_bert_classifier, build_bert_mlm, build_gpt2, check_room, padded, special_ids
from pipeline.teacher.load import load_pretrained, save_teacher
from pipeline.training.loader import BlockStream
from pipeline.training.loop import TrainFiles, train_loop
from pipeline.training.objective import Objective


def materialise_teacher(config: TeacherConfig, tokens_dir: str, out: str,
                        files: TrainFiles | str | None = None) -> dict:
    """Load `config.model` or train the default teacher; save it to `out` with its fingerprint."""
    Location(out).check_writable()  # a read-only --out fails now, not after training
    tokens = TokenStore(tokens_dir)
    if config.mlm_steps and tokens.task_name != "classification":
        raise KdcacheError(f"--mlm-steps pre-trains a classification teacher's encoder; this token store holds "
                           f"{tokens.task_name} rows, whose default teacher trains on them directly: set 0.")
    if config.model and not config.finetune:
        return save_teacher(load_pretrained(config.model, tokens, config.dtype), tokens, out, config.model, config, None)
    device = runtime.resolve_device(config.device)
    if config.model:  # --finetune: float32 weights train (under --dtype autocast), then are saved in --dtype
        model = load_pretrained(config.model, tokens, new_head=True)
    elif tokens.task_name == "classification":
        model = build_bert_classifier(config, padded(tokens.vocab_size, config.vocab_multiple), tokens.block_size,
                                      tokens.label_names, tokens.meta["pad_id"], config.seed)
    elif tokens.task_name == "masked":
        model = build_bert_mlm(config, padded(tokens.vocab_size, config.vocab_multiple), tokens.block_size,
                               tokens.meta["pad_id"], config.seed)
    else:
        model = build_gpt2(config, padded(tokens.vocab_size, config.vocab_multiple), tokens.block_size, config.seed,
                           special_ids(tokens.load_tokenizer()))
    check_room([model], out, "the trained teacher")
    if config.mlm_steps:  # a classification default teacher (checked above)
        pretrain_encoder(model, config, tokens, device)
    stream = BlockStream(tokens_dir, "train", shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    objective = Objective(vocab_size=tokens.num_outputs, task=tokens.task)
    history = train_loop(model, stream, config, objective, device,
                         "fine-tune teacher" if config.model else "train teacher", files)
    if not runtime.is_main():  # torchrun: rank 0 alone saves and fingerprints the teacher
        return {"source": config.model or "default", "rank": runtime.rank()}
    if config.model:  # --finetune: saved in --dtype, as a loaded --model is (the default teacher: float32)
        model.to(runtime.torch_dtype(config.dtype))
    return save_teacher(model, tokens, out, config.model or "default", config, history[-1]["loss"])


def pretrain_encoder(classifier, config: TeacherConfig, tokens: TokenStore, device) -> None:
    """Masked-LM pre-training of a fresh BERT classifier's encoder on the text of the store's train
    split (a temporary masked token store), for config.mlm_steps steps; the classification head stays
    fresh. Under torchrun every rank writes its own temporary store (the same bytes)."""
    mlm = build_bert_mlm(config, classifier.config.vocab_size, tokens.block_size, tokens.meta["pad_id"], config.seed)
    with tempfile.TemporaryDirectory(prefix="kdcache-mlm-") as tmp:
        masked = masked_lm_store(tokens, Path(tmp) / "tokens", seed=config.seed)
        stream = BlockStream(str(masked.path), "train", shuffle_buffer=config.shuffle_buffer, seed=config.seed)
        settings = replace(config, max_steps=config.mlm_steps, epochs=0, checkpoint_every=0)
        # No files: the loss curve and checkpoints belong to the training on the labels.
        train_loop(mlm, stream, settings, Objective(vocab_size=masked.num_outputs, task=masked.task), device,
                   "pre-train teacher (masked LM)", None)
    missing, unexpected = classifier.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise KdcacheError(f"masked-LM pre-training gave weights the classifier cannot take: missing {missing}, "
                           f"unexpected {unexpected}.")
