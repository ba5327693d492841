"""The classification teacher before distillation: masked-LM pre-training of the default teacher's
encoder on the train split's text (`teacher --mlm-steps`), and `teacher --model ENCODER --finetune`
(a pretrained encoder given a new head for the store's labels)."""

import numpy as np
import pytest
import torch

from pipeline.config import TeacherConfig
from pipeline.data.examples import masked_lm_store
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.models import build_bert_classifier, build_bert_mlm, check_fits
from pipeline.teacher.load import load_teacher
from pipeline.training.teacher import materialise_teacher, pretrain_encoder
from tests.test_classification import SHAPE, cls_tokens, labelled_corpus  # noqa: F401 (fixtures)

TEACHER = dict(n_layer=1, n_embd=32, n_head=2, batch_size=16, lr=3e-3, warmup_steps=2, eval_every=0)


def test_masked_lm_store_holds_the_examples_text_packed_and_masked(cls_tokens, tmp_path):
    store = masked_lm_store(cls_tokens, tmp_path / "mlm")
    assert isinstance(store, TokenStore) and store.task_name == "masked"
    tokenizer = cls_tokens.load_tokenizer()
    m = store.meta["mask_count"]
    assert m == round(0.15 * cls_tokens.block_size)
    for split in ("train", "validation"):
        rows = store.rows(split, 0, store.num_rows(split))
        ids = rows["input_ids"].clone()
        ids.scatter_(1, rows["mask_positions"].long(), rows["mask_labels"].long())  # undo the masks
        # The unpadded examples, in order, packed into blocks (the incomplete last block dropped).
        text = np.concatenate([row[keep.astype(bool)] for row, keep in
                               zip(cls_tokens.blocks(split), cls_tokens.column(split, "attention_mask"))])
        assert np.array_equal(ids.numpy().ravel(), text[:ids.numel()])
        assert (rows["mask_positions"].shape[1] == m)
        specials = torch.tensor(tokenizer.all_special_ids)
        assert not torch.isin(rows["mask_labels"].long(), specials).any()  # [CLS]/[SEP]/[PAD] are never masked
        assert (rows["input_ids"] == tokenizer.mask_token_id).float().mean() > 0.05
    assert store.tokenizer_path != cls_tokens.tokenizer_path and store.vocab_size == cls_tokens.vocab_size


def mlm_loss(encoder_state, tokens, mlm_store) -> float:
    """The masked-token loss on the validation split of an MLM whose encoder is `encoder_state`."""
    model = build_bert_mlm(SHAPE, tokens.vocab_size, tokens.block_size, tokens.meta["pad_id"], seed=0)
    model.bert.load_state_dict(encoder_state, strict=False)
    rows = mlm_store.rows("validation", 0, mlm_store.num_rows("validation"))
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"]).logits
    at = logits.gather(1, rows["mask_positions"].long().unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    return float(torch.nn.functional.cross_entropy(at.flatten(0, 1), rows["mask_labels"].long().flatten()))


def test_mlm_pretraining_trains_the_encoder_and_leaves_the_head_fresh(cls_tokens, tmp_path):
    config = TeacherConfig(**TEACHER, mlm_steps=40)
    fresh = build_bert_classifier(config, cls_tokens.vocab_size, cls_tokens.block_size, cls_tokens.label_names,
                                  cls_tokens.meta["pad_id"], seed=0)
    model = build_bert_classifier(config, cls_tokens.vocab_size, cls_tokens.block_size, cls_tokens.label_names,
                                  cls_tokens.meta["pad_id"], seed=0)
    pretrain_encoder(model, config, cls_tokens, torch.device("cpu"))
    assert torch.equal(model.classifier.weight, fresh.classifier.weight)
    assert torch.equal(model.bert.pooler.dense.weight, fresh.bert.pooler.dense.weight)
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, fresh.bert.embeddings.word_embeddings.weight)
    # The copied encoder predicts held-out masked tokens better than the fresh one.
    held_out = masked_lm_store(cls_tokens, tmp_path / "mlm")
    before = mlm_loss(fresh.bert.state_dict(), cls_tokens, held_out)
    after = mlm_loss(model.bert.state_dict(), cls_tokens, held_out)
    assert after < before - 0.5, (before, after)


def test_default_teacher_pretrains_then_trains_on_labels(cls_tokens, tmp_path):
    info = materialise_teacher(TeacherConfig(**TEACHER, max_steps=4, mlm_steps=4), str(cls_tokens.path),
                               str(tmp_path / "teacher"))
    assert info["source"] == "default" and info["config"]["mlm_steps"] == 4
    model, _ = load_teacher(tmp_path / "teacher")
    check_fits(model, cls_tokens, "teacher")
    assert not any(p.name.startswith("kdcache-mlm-") for p in tmp_path.iterdir())


def test_finetune_gives_a_pretrained_encoder_a_head_for_the_labels(cls_tokens, tmp_path):
    encoder = build_bert_mlm(SHAPE, cls_tokens.vocab_size, cls_tokens.block_size, cls_tokens.meta["pad_id"], seed=1)
    encoder.save_pretrained(tmp_path / "encoder")
    cls_tokens.load_tokenizer().save_pretrained(tmp_path / "encoder")
    config = TeacherConfig(**TEACHER, model=str(tmp_path / "encoder"), finetune=True, max_steps=3)
    info = materialise_teacher(config, str(cls_tokens.path), str(tmp_path / "teacher"))
    assert info["source"] == str(tmp_path / "encoder") and info["final_train_loss"] > 0
    model, _ = load_teacher(tmp_path / "teacher")
    check_fits(model, cls_tokens, "teacher")  # num_labels is the store's
    assert model.config.id2label == dict(enumerate(cls_tokens.label_names))
    # Fine-tuned: the encoder moved away from the loaded weights.
    loaded = encoder.bert.embeddings.word_embeddings.weight
    assert not torch.allclose(model.bert.embeddings.word_embeddings.weight, loaded)
    # Without --finetune the same encoder is refused: its head is not this store's.
    with pytest.raises(KdcacheError, match="classification head has 2 labels"):
        materialise_teacher(TeacherConfig(model=str(tmp_path / "encoder")), str(cls_tokens.path),
                            str(tmp_path / "refused"))


def test_finetune_and_mlm_steps_refuse_settings_that_make_no_sense(tiny_tokens, tmp_path):
    with pytest.raises(KdcacheError, match="--finetune trains a loaded --model"):
        TeacherConfig(finetune=True)
    with pytest.raises(KdcacheError, match="--mlm-steps pre-trains the default teacher"):
        TeacherConfig(model="some/encoder", mlm_steps=10)
    with pytest.raises(KdcacheError, match="holds causal rows"):
        materialise_teacher(TeacherConfig(**TEACHER, max_steps=2, mlm_steps=2), str(tiny_tokens.path),
                            str(tmp_path / "teacher"))
    assert not (tmp_path / "teacher").exists()
