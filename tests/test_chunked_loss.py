"""Chunked LM-head losses (loss_chunk) equal the unchunked ones: values and parameter gradients."""

import pytest
import torch

from pipeline.config import ModelShape
from pipeline.losses import KD_LOSSES
from pipeline.errors import KdcacheError
from pipeline.training.objective import Objective
from pipeline.models import check_chunkable
from pipeline.models import build_gpt2
from pipeline.targets import format as fmt

B, T, V, K, D_TEACHER = 3, 7, 40, 5, 12  # N = 21 positions: chunks of 4 leave a ragged last one


def topk_keys(g, teacher: int = 0):
    logprobs, ids = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2, -1).topk(K, -1)
    tail = torch.log(-torch.expm1(torch.logsumexp(logprobs, -1)))
    return {fmt.teacher_key(fmt.TOPK_IDS, teacher): ids, fmt.teacher_key(fmt.TOPK_LOGPROBS, teacher): logprobs,
            fmt.teacher_key(fmt.TAIL_LOGMASS, teacher): tail}


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, V, (B, T), generator=g), **topk_keys(g), **topk_keys(g, teacher=1),
            fmt.SAMPLED_IDS: torch.randint(0, V, (B, T, 6), generator=g),
            fmt.SAMPLED_COUNTS: torch.randint(0, 4, (B, T, 6), generator=g),
            fmt.hidden_array(2): torch.randn(B, T, D_TEACHER, generator=g)}


def loss_and_grads(objective, batch, seed=0):
    """(parts, {parameter name: grad}) of one backward on a freshly built, identical model."""
    model = build_gpt2(ModelShape(n_layer=2, n_embd=16, n_head=2), V + 8, T, seed)  # padded head: 48 rows
    parts = objective(model, batch, progress=0.4)
    parts["loss"].backward()
    modules = [model] + ([objective.projections] if objective.projections is not None else [])
    grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}
    return parts, grads


def assert_same(settings, batch, chunk=4):
    plain_parts, plain_grads = loss_and_grads(Objective(vocab_size=V, **settings()), batch)
    chunked_parts, chunked_grads = loss_and_grads(Objective(vocab_size=V, loss_chunk=chunk, **settings()), batch)
    assert set(plain_parts) == set(chunked_parts)
    for name in plain_parts:
        assert chunked_parts[name].item() == pytest.approx(plain_parts[name].item(), rel=1e-5, abs=1e-7), name
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) > 5
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss", KD_LOSSES)
def test_every_kd_loss_chunked_equals_unchunked(batch, loss, temperature):
    assert_same(lambda: dict(alpha=0.3, temperature=temperature, loss=loss), batch)


@pytest.mark.parametrize("chunk", [1, 4, 21, 100])
def test_chunk_sizes_from_one_position_to_more_than_all(batch, chunk):
    assert_same(lambda: dict(alpha=0.3, temperature=2.0), batch, chunk)


def test_ce_only_chunked_equals_unchunked(batch):
    assert_same(lambda: dict(alpha=1.0), batch)


def test_sampled_kd_chunked_equals_unchunked(batch):
    assert_same(lambda: dict(alpha=0.5, temperature=2.0, kd_signal="sampled"), batch)


@pytest.mark.parametrize("mode", ["mixture", "sum"])
def test_two_teachers_chunked_equals_unchunked(batch, mode):
    assert_same(lambda: dict(alpha=0.2, loss="tail_jsd", teacher_weights=(0.6, 0.4), multi_teacher=mode), batch)


def test_hidden_loss_chunked_equals_unchunked(batch):
    def settings():
        torch.manual_seed(5)  # the same projection on both sides
        projections = torch.nn.ModuleDict({"1": torch.nn.Linear(16, D_TEACHER, bias=False)})
        return dict(alpha=0.5, beta=0.8, layer_pairs=[(1, 2)], projections=projections)

    assert_same(settings, batch)
    parts, grads = loss_and_grads(Objective(vocab_size=V, loss_chunk=4, **settings()), batch)
    assert parts["hidden"] > 0 and grads["1.1.weight"].abs().sum() > 0  # the projection learns


def test_relative_hidden_loss_is_the_same_for_a_teacher_on_a_thousand_times_the_scale(batch):
    def hidden_part(hidden_loss: str, scale: float) -> float:
        torch.manual_seed(5)
        projections = torch.nn.ModuleDict({"1": torch.nn.Linear(16, D_TEACHER, bias=False)})
        projections["1"].weight.data *= scale  # the projection that keeps up with that teacher
        scaled = {**batch, fmt.hidden_array(2): scale * batch[fmt.hidden_array(2)]}
        objective = Objective(vocab_size=V, alpha=0.5, beta=0.8, layer_pairs=[(1, 2)], projections=projections,
                              hidden_loss=hidden_loss)
        return loss_and_grads(objective, scaled)[0]["hidden"].item()

    assert hidden_part("relative", 1000.0) == pytest.approx(hidden_part("relative", 1.0), rel=1e-4)
    assert hidden_part("mse", 1000.0) == pytest.approx(1e6 * hidden_part("mse", 1.0), rel=1e-4)


def test_a_model_with_soft_capped_logits_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    check_chunkable(LlamaForCausalLM(LlamaConfig(**shape)))  # logits = lm_head(norm(h)): accepted
    capped = Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=0.5))
    assert capped.training
    with pytest.raises(KdcacheError, match="loss_chunk 0"):
        check_chunkable(capped)
    assert capped.training  # the check leaves the training mode as it found it


def test_a_llama_chunked_equals_unchunked(batch):
    from transformers import LlamaConfig, LlamaForCausalLM

    def run(chunk):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=8))
        parts = Objective(vocab_size=V, alpha=0.3, loss_chunk=chunk)(model, batch)
        parts["loss"].backward()
        return parts["loss"].item(), model.lm_head.weight.grad

    (plain, plain_grad), (chunked, chunked_grad) = run(0), run(5)
    assert chunked == pytest.approx(plain, rel=1e-5)
    torch.testing.assert_close(chunked_grad, plain_grad, atol=1e-6, rtol=1e-4)


def test_student_cli_with_loss_chunk_logs_the_same_losses(kdcache, small_tokens, small_targets, tmp_path):
    import csv

    def losses_of(*options):
        log = tmp_path / f"log{len(options)}.csv"
        result = kdcache("student", "--tokens", small_tokens, "--targets", small_targets, "--out", tmp_path / "s",
                         "--log", log, "--max-steps", 2, "--n-layer", 1, "--n-embd", 16, "--n-head", 2,
                         "--batch-size", 4, "--loss", "tail_rkl", *options)
        assert result.exit_code == 0, result.output
        return [float(row["loss"]) for row in csv.DictReader(log.open())]

    assert losses_of("--loss-chunk", 24) == pytest.approx(losses_of(), rel=1e-5)


def test_loss_chunk_under_torchrun_is_refused_before_training(small_tokens, small_targets, tmp_path, monkeypatch):
    from pipeline.config import StudentConfig
    from pipeline.student import run_student

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the library call sets up no process group
    config = StudentConfig(max_steps=1, loss_chunk=16, n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(KdcacheError, match="set loss_chunk 0"):
        run_student(config, str(small_tokens), str(tmp_path / "s"), str(small_targets))
    assert not (tmp_path / "s").exists()
