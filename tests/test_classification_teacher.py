"""The classification teacher before distillation: masked-LM pre-training of the default teacher's
encoder on the train split's text (`teacher --mlm-steps`), and `teacher --model ENCODER --finetune`
(a pretrained encoder given a new head for the store's labels)."""

import json

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


@pytest.fixture(scope="module")
def decoder_dir(labelled_corpus, tmp_path_factory):
    """A tiny LlamaForCausalLM built from a config, saved with a decoder's tokenizer: an end-of-text
    token but no pad token, and no pad_token_id in the config (as GPT-2 and Llama ship)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.data.tokens import train_bpe_tokenizer

    texts = [json.loads(line)["text"] for line in labelled_corpus.read_text().splitlines()]
    tokenizer = train_bpe_tokenizer(texts, 300)
    tokenizer.pad_token = None
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=None)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("decoder") / "llama"
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_finetune_makes_a_decoder_a_classifier_whose_store_trains_students(kdcache, decoder_dir, labelled_corpus,
                                                                           tmp_path):
    result = kdcache("prepare", "--out", tmp_path / "tokens", "--task", "classification", "--corpus", labelled_corpus,
                     "--label-field", "topic", "--tokenizer", decoder_dir, "--block-size", 24, "--val-fraction", 0.2)
    assert result.exit_code == 0, result.output
    tokens = TokenStore(tmp_path / "tokens")
    eos = tokens.load_tokenizer().eos_token_id
    assert tokens.meta["pad_id"] == eos  # no pad token: rows are padded with end of text, on the right
    mask = tokens.column("train", "attention_mask").astype(bool)
    assert (np.diff(mask.astype(int), axis=1) <= 0).all() and (tokens.blocks("train")[~mask] == eos).all()

    result = kdcache("teacher", "--tokens", tmp_path / "tokens", "--out", tmp_path / "teacher", "--model", decoder_dir,
                     "--finetune", "--max-steps", 3, "--batch-size", 8, "--lr", 3e-3, "--warmup-steps", 1)
    assert result.exit_code == 0, result.output
    model, _ = load_teacher(tmp_path / "teacher")
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.pad_token_id == eos
    # It pools each row's last real token: a padded row scores as it does alone, unpadded.
    rows = tokens.rows("validation", 0, 4)
    with torch.no_grad():
        batched = model(input_ids=rows["input_ids"].long(), attention_mask=rows["attention_mask"].long()).logits
        for i, keep in enumerate(rows["attention_mask"].bool()):
            alone = model(input_ids=rows["input_ids"][i][keep].long().unsqueeze(0)).logits[0]
            assert torch.allclose(batched[i], alone, atol=1e-5)

    for args in (("cache", "--teacher", tmp_path / "teacher", "--tokens", tmp_path / "tokens", "--out",
                  tmp_path / "targets.zarr", "--batch-size", 16),
                 ("student", "--tokens", tmp_path / "tokens", "--targets", tmp_path / "targets.zarr", "--out",
                  tmp_path / "lstm", "--arch", "lstm", "--n-layer", 1, "--n-embd", 16, "--n-head", 1,
                  "--max-steps", 2, "--batch-size", 8, "--alpha", 0.5),
                 ("evaluate", "--tokens", tmp_path / "tokens", "--model", f"teacher={tmp_path / 'teacher'}",
                  "--model", f"lstm={tmp_path / 'lstm'}", "--out", tmp_path / "metrics.json", "--latency-rounds", 1)):
        result = kdcache(*args)
        assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())["models"]
    assert metrics["teacher"]["top1_agreement"] == 1.0 and 0 <= metrics["lstm"]["accuracy"] <= 1


def test_a_trained_classifier_padded_otherwise_than_the_store_is_refused(cls_tokens, tmp_path):
    from pipeline.teacher.load import load_pretrained

    model = build_bert_classifier(SHAPE, cls_tokens.vocab_size, cls_tokens.block_size, cls_tokens.label_names,
                                  cls_tokens.meta["pad_id"] + 1, seed=0)
    model.save_pretrained(tmp_path / "classifier")
    cls_tokens.load_tokenizer().save_pretrained(tmp_path / "classifier")
    with pytest.raises(KdcacheError, match="pads with id .* padded with id"):
        load_pretrained(str(tmp_path / "classifier"), cls_tokens)
    assert load_pretrained(str(tmp_path / "classifier"), cls_tokens, new_head=True).config.pad_token_id == \
        cls_tokens.meta["pad_id"]


def test_prepare_refuses_a_tokenizer_without_pad_or_end_of_text(decoder_dir, labelled_corpus, tmp_path):
    from pipeline.config import PrepareConfig
    from pipeline.data.tokens import prepare_tokens
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(decoder_dir)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "bare")
    config = PrepareConfig(corpus=str(labelled_corpus), task="classification", label_field="topic",
                           tokenizer=str(tmp_path / "bare"), block_size=24)
    with pytest.raises(KdcacheError, match="neither a pad nor an end-of-text token"):
        prepare_tokens(config, tmp_path / "tokens")
    assert not (tmp_path / "tokens").exists()
