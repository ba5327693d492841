"""`kdcache teacher`: load a pretrained teacher, or train the small default one on the token store.

The default teacher is the student architecture at teacher size, trained on hard labels with the
same loop as the students: GPT-2 for causal LM; for masked LM a BERT trained on the token store's
fixed masks (every view of the train split); for classification a BERT classifier trained on the
labels from scratch (no masked-LM pre-training yet). Saving and fingerprinting belong to teacher/load.py.
"""

from __future__ import annotations

from pipeline import runtime
from pipeline.config import TeacherConfig
from pipeline.data.tokens import TokenStore
from pipeline.location import Location
from pipeline.models import build_bert_classifier, build_bert_mlm, build_gpt2, padded, special_ids
from pipeline.teacher.load import load_pretrained, save_teacher
from pipeline.training.loader import BlockStream
from pipeline.training.loop import TrainFiles, train_loop
from pipeline.training.objective import Objective


def materialise_teacher(config: TeacherConfig, tokens_dir: str, out: str,
                        files: TrainFiles | str | None = None) -> dict:
    """Load `config.model` or train the default teacher; save it to `out` with its fingerprint."""
    Location(out).check_writable()  # a read-only --out fails now, not after training
    tokens = TokenStore(tokens_dir)
    if config.model:
        return save_teacher(load_pretrained(config.model, tokens, config.dtype), tokens, out, config.model, config, None)
    if tokens.task_name == "classification":
        model = build_bert_classifier(config, padded(tokens.vocab_size, config.vocab_multiple), tokens.block_size,
                                      tokens.label_names, tokens.meta["pad_id"], config.seed)
    elif tokens.task_name == "masked":
        model = build_bert_mlm(config, padded(tokens.vocab_size, config.vocab_multiple), tokens.block_size,
                               tokens.meta["pad_id"], config.seed)
    else:
        model = build_gpt2(config, padded(tokens.vocab_size, config.vocab_multiple), tokens.block_size, config.seed,
                           special_ids(tokens.load_tokenizer()))
    stream = BlockStream(tokens_dir, "train", shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    objective = Objective(vocab_size=tokens.num_outputs, task=tokens.task)
    history = train_loop(model, stream, config, objective,
                         runtime.resolve_device(config.device), "train teacher", files)
    if not runtime.is_main():  # torchrun: rank 0 alone saves and fingerprints the teacher
        return {"source": "default", "rank": runtime.rank()}
    return save_teacher(model, tokens, out, "default", config, history[-1]["loss"])
