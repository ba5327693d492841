"""Masked LM end to end (DistilBERT's recipe): masks fixed at prepare time, BERT teacher, capture at the
M masked positions (+ hidden states everywhere), students with KD + MLM + cosine, evaluation, errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import CacheConfig, EvaluateConfig, ModelShape, PrepareConfig, StudentConfig, TeacherConfig
from pipeline.data.tokens import TokenStore, prepare_tokens
from pipeline.errors import KdcacheError
from pipeline.targets import format as fmt

SHAPE = ModelShape(n_layer=2, n_embd=32, n_head=2)
M = 5  # round(0.15 · 32)


@pytest.fixture(scope="module")
def mlm_tokens(small_corpus, tmp_path_factory):
    config = PrepareConfig(corpus=str(small_corpus), task="masked", vocab_size=300, block_size=32,
                           val_fraction=0.3, mask_views=2)
    return prepare_tokens(config, tmp_path_factory.mktemp("mlm") / "tokens")


@pytest.fixture(scope="module")
def mlm_teacher(mlm_tokens, tmp_path_factory):
    """A tiny BertForMaskedLM built from a config and saved as a teacher directory."""
    from pipeline.models import build_bert_mlm
    from pipeline.teacher.load import save_teacher

    model = build_bert_mlm(SHAPE, mlm_tokens.vocab_size, mlm_tokens.block_size, mlm_tokens.meta["pad_id"], seed=3)
    out = tmp_path_factory.mktemp("mlm") / "teacher"
    save_teacher(model, mlm_tokens, out, "test", TeacherConfig(model="x"), None)
    return out


@pytest.fixture(scope="module")
def mlm_targets(mlm_tokens, mlm_teacher, tmp_path_factory):
    from pipeline.teacher.capture import run_capture

    config = CacheConfig(top_k=4, layers=(0, 2), rows_per_chunk=8, rows_per_shard=32, batch_size=16)
    return run_capture(config, str(mlm_teacher), str(mlm_tokens.path), str(tmp_path_factory.mktemp("mlm") / "t.zarr"))


def test_prepare_fixes_exactly_m_masks_per_block_in_views(mlm_tokens, small_corpus, tmp_path):
    meta = mlm_tokens.meta
    assert mlm_tokens.task_name == "masked" and meta["mask_count"] == M and meta["mask_views"] == 2
    tokenizer = mlm_tokens.load_tokenizer()
    assert meta["mask_id"] == tokenizer.mask_token_id is not None and tokenizer.pad_token == "[PAD]"
    rows = mlm_tokens.num_rows("train")
    assert rows % 2 == 0
    blocks = rows // 2
    batch = mlm_tokens.rows("train", 0, rows)
    positions, labels, ids = batch["mask_positions"], batch["mask_labels"], batch["input_ids"]
    assert positions.shape == labels.shape == (rows, M)
    assert (positions.diff(dim=1) > 0).all() and positions.max() < 32  # sorted, distinct, in the block
    # The two views are the same blocks masked differently: unmasked positions agree, masks differ.
    originals = ids.clone().scatter_(1, positions, labels)  # (rows, T) the packed blocks
    torch.testing.assert_close(originals[:blocks], originals[blocks:])
    assert (positions[:blocks] != positions[blocks:]).any(dim=1).float().mean() > 0.9
    unmasked = torch.ones_like(ids, dtype=torch.bool).scatter_(1, positions, False)
    assert torch.equal(ids[unmasked], originals[unmasked])
    assert (ids.gather(1, positions) == meta["mask_id"]).float().mean() > 0.6  # 80% [MASK]
    assert mlm_tokens.column("validation", "mask_positions").shape == (mlm_tokens.num_rows("validation"), M)
    again = prepare_tokens(PrepareConfig(corpus=str(small_corpus), task="masked", vocab_size=300, block_size=32,
                                         val_fraction=0.3, mask_views=2), tmp_path / "again")
    assert again.fingerprint == mlm_tokens.fingerprint  # seeded: the same masks


def test_mask_blocks_replaces_80_10_10_and_skips_specials():
    from pipeline.data.masking import mask_blocks

    rng = np.random.default_rng(0)
    blocks = rng.integers(10, 1000, size=(400, 50))
    blocks[:, ::10] = 1  # a special token every 10 positions
    out = mask_blocks(blocks, 0.2, 1, 7, 0, mask_id=2, special_ids=[0, 1, 2], vocab_size=1000)
    positions, labels, ids = out["mask_positions"].astype(np.int64), out["mask_labels"], out["input_ids"]
    assert positions.shape == (400, 10) and (np.diff(positions, axis=1) > 0).all()
    assert (positions % 10 != 0).all()  # 45 ordinary positions per block: no special is masked
    np.testing.assert_array_equal(labels, np.take_along_axis(blocks, positions, axis=1))
    placed = np.take_along_axis(ids, positions, axis=1)
    masked, kept = (placed == 2).mean(), (placed == labels).mean()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and not np.isin(placed[placed != 2], [0, 1]).any()
    same = mask_blocks(blocks, 0.2, 1, 7, 0, mask_id=2, special_ids=[0, 1, 2], vocab_size=1000)
    np.testing.assert_array_equal(same["input_ids"], ids)


def test_prepare_refuses_a_tokenizer_without_a_mask_token(small_corpus, tmp_path):
    from pipeline.data.tokens import train_bpe_tokenizer

    train_bpe_tokenizer(["some text to learn from"] * 20, 280).save_pretrained(tmp_path / "gpt_like")
    with pytest.raises(KdcacheError, match="has no mask token, which --task masked needs"):
        prepare_tokens(PrepareConfig(corpus=str(small_corpus), task="masked", tokenizer=str(tmp_path / "gpt_like")),
                       tmp_path / "tokens")
    assert not (tmp_path / "tokens").exists()
    with pytest.raises(KdcacheError, match="mask_rate must be in"):
        PrepareConfig(task="masked", mask_rate=1.0)


def test_capture_keeps_topk_at_the_masked_positions_and_hidden_states_everywhere(mlm_tokens, mlm_teacher,
                                                                                 mlm_targets):
    from pipeline.models import load_model

    store, rows = mlm_targets, mlm_targets.rows
    assert store.attrs["task"] == "masked" and store.attrs["mask_count"] == M
    stored = store.read_rows(0, rows)
    assert stored[fmt.TOPK_IDS].shape == (rows, M, 4) and stored[fmt.TAIL_LOGMASS].shape == (rows, M)
    assert stored[fmt.hidden_array(2)].shape == (rows, 32, 32)
    np.testing.assert_array_equal(stored[fmt.TARGET_POSITIONS], mlm_tokens.column("train", "mask_positions"))
    decoded = store.decode(stored)
    batch = mlm_tokens.rows("train", 0, rows)
    model = load_model(str(mlm_teacher), task=mlm_tokens.task).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], output_hidden_states=True)
    logprobs = torch.log_softmax(out.logits, -1).gather(
        1, batch["mask_positions"].unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))  # (R, M, V)
    torch.testing.assert_close(decoded[fmt.TOPK_LOGPROBS], logprobs.topk(4, -1).values, atol=2e-3, rtol=0)
    torch.testing.assert_close(decoded[fmt.hidden_array(2)], out.hidden_states[2], atol=2e-2, rtol=1e-2)


def test_masks_are_identical_between_capture_and_student(mlm_tokens, mlm_targets, monkeypatch):
    """What a student batch holds (the token store's masks) is where the teacher's targets were taken."""
    from pipeline.training.loader import BlockStream, make_loader

    names = mlm_targets.topk_names() + [fmt.TARGET_POSITIONS]
    stream = BlockStream(str(mlm_tokens.path), "train", str(mlm_targets.path), names, rows_per_shard=32)
    for batch in make_loader(stream, 16):
        assert torch.equal(batch["mask_positions"], batch[fmt.TARGET_POSITIONS])
        tokens = mlm_tokens.rows("train", 0, mlm_tokens.num_rows("train"))
        assert torch.equal(batch["input_ids"], tokens["input_ids"][batch["row"]])
    mlm_targets.check_compatible(mlm_tokens)
    other = TokenStore(mlm_tokens.path)  # the same store, as if its masks had been redrawn
    shifted = (other.column("train", "mask_positions") + 1) % 32
    monkeypatch.setattr(other, "column", lambda split, name: shifted)
    with pytest.raises(KdcacheError, match="captured at other masked positions"):
        mlm_targets.check_compatible(other)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_masked_kd_equals_the_dense_reference_at_the_masked_positions(temperature):
    from pipeline.tasks import MASKED
    from pipeline.teacher.signals import teacher_targets
    from pipeline.training.objective import Objective

    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 8, 7
    teacher_logits, student_logits = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 3

    class Fixed(torch.nn.Module):  # a model whose logits are given: the loss, not a model, is under test
        def __init__(self, logits):
            super().__init__()
            self.logits = torch.nn.Parameter(logits.clone())

        def forward(self, input_ids, output_hidden_states=False):
            return type("Out", (), {"logits": self.logits})()

    positions = torch.tensor([[0, 3], [2, 7], [5, 6]])
    labels = torch.tensor([[1, 2], [3, 4], [5, 6]])
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "mask_positions": positions, "mask_labels": labels}
    batch.update(teacher_targets(Fixed(teacher_logits), None, V, V, task=MASKED, rows=batch))
    assert torch.equal(batch[fmt.TARGET_POSITIONS], positions)
    at = lambda logits: logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, V)).flatten(0, 1)  # noqa: E731
    dense = F.kl_div(torch.log_softmax(at(student_logits) / temperature, -1),
                     torch.log_softmax(at(teacher_logits) / temperature, -1), log_target=True, reduction="batchmean")
    kd = Objective(vocab_size=V, alpha=0.0, temperature=temperature, task=MASKED)(Fixed(student_logits), batch)
    assert kd["loss"].item() == pytest.approx(temperature**2 * dense.item(), rel=1e-5, abs=1e-6)
    ce = Objective(vocab_size=V, task=MASKED)(Fixed(student_logits), batch)["loss"]
    assert ce.item() == pytest.approx(F.cross_entropy(at(student_logits), labels.flatten()).item(), rel=1e-6)


def test_kd_student_from_teacher_layers_with_cosine_and_ce_student_evaluate(mlm_tokens, mlm_teacher, mlm_targets,
                                                                            tmp_path):
    from transformers import AutoModelForMaskedLM

    from pipeline.evaluate import run_evaluate
    from pipeline.student import run_student

    common = dict(n_layer=1, n_embd=16, n_head=2, max_steps=2, batch_size=8, warmup_steps=1)
    last = run_student(StudentConfig(init_from_teacher="every_other", cosine=1.0, beta=0.5, **common),
                       str(mlm_tokens.path), str(tmp_path / "kd"), [str(mlm_targets.path)],
                       teacher_dir=str(mlm_teacher))
    assert {"ce", "kd", "cosine", "hidden"} <= set(last) and 0 <= last["cosine"] <= 2
    run_student(StudentConfig(alpha=1.0, **common), str(mlm_tokens.path), str(tmp_path / "ce"))
    kd = AutoModelForMaskedLM.from_pretrained(tmp_path / "kd")
    assert type(kd).__name__ == "BertForMaskedLM" and kd.config.num_hidden_layers == 1
    assert kd.config.hidden_size == 32  # the teacher's width (every other layer of 2: layer 0)
    result = run_evaluate(EvaluateConfig(batch_size=8, latency_rounds=1), str(mlm_tokens.path),
                          {"teacher": str(mlm_teacher), "kd": str(tmp_path / "kd"), "ce": str(tmp_path / "ce")},
                          str(tmp_path / "metrics.json"), figures_dir=str(tmp_path / "figures"))
    assert result["task"] == "masked" and result["mask_count"] == M
    metrics = result["models"]
    assert metrics["teacher"]["top1_agreement"] == 1.0
    for m in metrics.values():
        assert 0 <= m["accuracy"] <= 1 and m["perplexity"] == pytest.approx(np.exp(m["val_loss"]))
        assert m["latency_ms_per_token"] > 0 and 0 <= m["top1_agreement"] <= 1
    assert "loss_by_position.svg" not in {p.name for p in (tmp_path / "figures").iterdir()}


def test_default_teacher_is_a_bert_trained_on_the_masks(mlm_tokens, tmp_path):
    from transformers import AutoModelForMaskedLM

    from pipeline.training.teacher import materialise_teacher

    info = materialise_teacher(TeacherConfig(n_layer=1, n_embd=32, n_head=2, max_steps=2, batch_size=8,
                                             warmup_steps=1), str(mlm_tokens.path), str(tmp_path / "teacher"))
    assert info["task"] == "masked" and np.isfinite(info["final_train_loss"])
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path / "teacher")).__name__ == "BertForMaskedLM"


def test_stores_and_models_of_another_task_are_refused_before_work(mlm_tokens, mlm_teacher, mlm_targets,
                                                                   small_tokens, small_teacher, tmp_path):
    from pipeline.evaluate import run_evaluate
    from pipeline.student import run_student
    from pipeline.teacher.capture import run_capture

    config = StudentConfig(n_layer=1, n_embd=16, n_head=2, max_steps=1, batch_size=4)
    with pytest.raises(KdcacheError, match="holds masked targets but the token store .* holds causal"):
        run_student(config, str(small_tokens), str(tmp_path / "s"), [str(mlm_targets.path)])
    with pytest.raises(KdcacheError, match="is a causal model but the token store .* holds masked"):
        run_capture(CacheConfig(), str(small_teacher), str(mlm_tokens.path), str(tmp_path / "t.zarr"))
    with pytest.raises(KdcacheError, match="--arch lstm is a sequence classifier"):
        run_student(StudentConfig(arch="lstm", n_layer=1, n_embd=16, n_head=2, max_steps=1), str(mlm_tokens.path),
                    str(tmp_path / "s"))
    with pytest.raises(KdcacheError, match="a masked student trains offline"):
        run_student(StudentConfig(mode="online", n_layer=1, n_embd=16, n_head=2, max_steps=1), str(mlm_tokens.path),
                    str(tmp_path / "s"), teacher_dir=str(mlm_teacher))
    with pytest.raises(KdcacheError, match="--cosine compares"):
        run_student(StudentConfig(cosine=1.0, n_layer=1, n_embd=16, n_head=2, max_steps=1), str(mlm_tokens.path),
                    str(tmp_path / "s"))
    with pytest.raises(KdcacheError, match="is a causal model but the token store holds masked rows"):
        run_evaluate(EvaluateConfig(), str(mlm_tokens.path), {"teacher": str(small_teacher)}, str(tmp_path / "m.json"))
    assert not (tmp_path / "s").exists() and not (tmp_path / "t.zarr").exists()
