"""The training objective and loop on a tiny real GPT-2 and a real targets store."""

import pytest
import torch

from pipeline import losses
from pipeline.config import StudentConfig
from pipeline.errors import KdcacheError
from pipeline.losses import KD_LOSSES
from pipeline.models import build_gpt2
from pipeline.config import ModelShape
from pipeline.targets import format as fmt
from pipeline.student.offline import uniform_layer_map
from pipeline.training.objective import Objective
from pipeline.training.loop import lr_at

B, T, V, K = 2, 8, 40, 5


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g), -1)
    logprobs, ids = teacher.topk(K, -1)
    tail = torch.log(-torch.expm1(torch.logsumexp(logprobs, -1)))
    return {"input_ids": torch.randint(0, V, (B, T), generator=g), fmt.TOPK_IDS: ids,
            fmt.TOPK_LOGPROBS: logprobs, fmt.TAIL_LOGMASS: tail}


def test_the_config_accepts_every_registered_loss_and_refuses_others():
    for name in losses.KD_LOSS_FUNCTIONS:
        assert StudentConfig(loss=name).loss == name
    with pytest.raises(KdcacheError, match="unknown loss 'tail_kld'"):
        StudentConfig(loss="tail_kld")


@pytest.mark.parametrize("name", KD_LOSSES)
def test_every_kd_loss_trains_a_real_model(batch, name):
    model = build_gpt2(ModelShape(n_layer=1, n_embd=16, n_head=2), V, T)
    parts = Objective(vocab_size=V, alpha=0.5, temperature=1.0, loss=name)(model, batch)
    parts["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(parts["loss"]) and parts["kd"] > 0
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_objective_mixes_ce_and_kd_as_documented(batch):
    model = build_gpt2(ModelShape(n_layer=1, n_embd=16, n_head=2), V, T)
    alpha, tau = 0.3, 2.0
    parts = Objective(vocab_size=V, alpha=alpha, temperature=tau)(model, batch)
    logits = model(input_ids=batch["input_ids"]).logits
    ce = losses.cross_entropy(logits[:, :-1].reshape(-1, V), batch["input_ids"][:, 1:].reshape(-1))
    kd = losses.tail_kl(logits.reshape(-1, V), batch[fmt.TOPK_IDS].flatten(0, 1),
                        batch[fmt.TOPK_LOGPROBS].flatten(0, 1), batch[fmt.TAIL_LOGMASS].flatten(), tau)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(alpha * ce.item() + (1 - alpha) * tau**2 * kd.item(), rel=1e-5)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.55)


def test_uniform_layer_map():
    assert uniform_layer_map([0, 2, 4], teacher_layers=4, student_layers=2) == [(0, 0), (1, 2), (2, 4)]


def test_validation_loss_is_the_mean_next_token_cross_entropy(tiny_tokens):
    from pipeline.config import TrainSettings
    from pipeline.training.loader import BlockStream
    from pipeline.training.loop import validation_batches, validation_loss

    stream = BlockStream(str(tiny_tokens.path), "train", None)
    batches = validation_batches(stream, TrainSettings(batch_size=3, eval_batches=2))
    blocks = torch.from_numpy(tiny_tokens.blocks("validation")[:6].astype("int64"))
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), blocks)  # the first eval_batches x batch_size
    model = build_gpt2(ModelShape(n_layer=1, n_embd=16, n_head=2), tiny_tokens.vocab_size, tiny_tokens.block_size)
    with torch.no_grad():
        expected = [torch.nn.functional.cross_entropy(model(input_ids=b["input_ids"]).logits[:, :-1].flatten(0, 1),
                                                      b["input_ids"][:, 1:].flatten()) for b in batches]
    loss = validation_loss(model, batches, tiny_tokens.vocab_size, torch.device("cpu"))
    assert loss == pytest.approx(float(sum(expected) / 2), rel=1e-5)
    assert model.training  # left in training mode


def test_progress_in_a_log_is_one_line_per_redraw(capsys):
    from pipeline.progress import progress

    bar = progress(total=3, desc="train", unit="step", mininterval=0)
    for _ in range(3):
        bar.set_postfix(loss="1.000", tok_s="10", refresh=False)
        bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) >= 3 and lines[-1].startswith("train: 100%")
    assert "3/3 [" in lines[-1] and "<00:00" in lines[-1] and "loss=1.000, tok_s=10" in lines[-1]  # ETA, postfix
