"""Training options Hugging Face users expect: gradient accumulation, clipping, mixed precision, and the
small command-line conveniences (--version, --text-field, evaluate --device), on tiny real models."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ModelShape, StudentConfig
from pipeline.errors import KdcacheError
from pipeline.models import build_gpt2
from pipeline.student import run_student
from pipeline.targets import format as fmt
from pipeline.training.loop import TrainStep, accumulate_gradients, micro_batches
from pipeline.training.objective import Objective

TINY = dict(n_layer=1, n_embd=16, n_head=2, batch_size=8, max_steps=2, warmup_steps=1, lr=3e-3, alpha=0.5,
            shuffle_buffer=8, device="cpu")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def train(tmp_path, tokens, targets, name, **settings):
    out = tmp_path / name
    run_student(StudentConfig(**{**TINY, **settings}), str(tokens), str(out), str(targets), str(out / "loss.csv"))
    return load_file(out / "model.safetensors"), read_csv(out / "loss.csv")


# --- gradient accumulation -----------------------------------------------------------------------


def test_micro_batch_gradients_sum_to_the_whole_batch_gradient():
    B, T, V, K = 6, 8, 40, 5
    g = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g), -1)
    logprobs, ids = teacher.topk(K, -1)
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=g), fmt.TOPK_IDS: ids, fmt.TOPK_LOGPROBS: logprobs,
             fmt.TAIL_LOGMASS: torch.log(-torch.expm1(torch.logsumexp(logprobs, -1)))}
    model = build_gpt2(ModelShape(n_layer=1, n_embd=16, n_head=2), V, T)
    step = TrainStep(model, [], Objective(vocab_size=V, alpha=0.3, temperature=2.0))

    def gradients(count):
        model.zero_grad()
        parts = accumulate_gradients(step, micro_batches(batch, count), 0.0, torch.autocast("cpu", enabled=False),
                                     None)
        return parts, {name: p.grad.clone() for name, p in model.named_parameters()}

    whole_parts, whole = gradients(1)
    for count in (2, 3, 6):
        parts, accumulated = gradients(count)
        assert parts["loss"].item() == pytest.approx(whole_parts["loss"].item(), rel=1e-5)
        assert parts["kd"].item() == pytest.approx(whole_parts["kd"].item(), rel=1e-5)
        for name in whole:
            torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6)


def test_accumulated_training_equals_one_large_batch(small_tokens, small_targets, tmp_path):
    whole, whole_log = train(tmp_path, small_tokens, small_targets, "whole")
    accumulated, accumulated_log = train(tmp_path, small_tokens, small_targets, "accumulated",
                                         gradient_accumulation_steps=4)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-5)
    for a, b in zip(whole_log, accumulated_log):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4)


def test_accumulation_that_does_not_divide_the_batch_is_refused(small_tokens, small_targets, tmp_path):
    with pytest.raises(KdcacheError, match="gradient_accumulation_steps 3 must divide the 8 blocks"):
        train(tmp_path, small_tokens, small_targets, "bad", gradient_accumulation_steps=3)
    assert not (tmp_path / "bad" / "model.safetensors").exists()


# --- gradient clipping ---------------------------------------------------------------------------


@pytest.fixture
def step_gradient_norms():
    """The global gradient norm each optimizer step sees, recorded by a torch optimizer hook."""
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(record)
    yield norms
    hook.remove()


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0])
def test_clipping_bounds_the_gradient_norm(small_tokens, small_targets, tmp_path, step_gradient_norms,
                                           max_grad_norm):
    _, log = train(tmp_path, small_tokens, small_targets, "clipped", max_grad_norm=max_grad_norm, max_steps=3)
    logged = [float(row["grad_norm"]) for row in log]  # before clipping
    assert len(step_gradient_norms) == len(logged) == 3
    assert min(logged) > 0.05  # so a bound of 0.05 has something to clip
    if max_grad_norm:
        assert max(step_gradient_norms) <= max_grad_norm * (1 + 1e-5)
    else:  # 0: no clipping, the optimizer sees the gradient as computed
        assert step_gradient_norms == pytest.approx(logged, rel=1e-5)


# --- mixed precision -----------------------------------------------------------------------------


def test_bfloat16_autocast_trains_float32_weights_close_to_float32(small_tokens, small_targets, tmp_path):
    full, full_log = train(tmp_path, small_tokens, small_targets, "float32")
    half, half_log = train(tmp_path, small_tokens, small_targets, "bfloat16", dtype="bfloat16")
    assert all(tensor.dtype == torch.float32 for tensor in half.values())  # the master weights
    assert float(half_log[0]["loss"]) == pytest.approx(float(full_log[0]["loss"]), rel=0.03)
    assert float(half_log[0]["loss"]) != float(full_log[0]["loss"])  # the forward pass did run in bfloat16
    assert any(not torch.equal(full[name], half[name]) for name in full)


def test_float16_needs_cuda(small_tokens, small_targets, tmp_path):
    if torch.cuda.is_available():
        _, log = train(tmp_path, small_tokens, small_targets, "fp16", dtype="float16", device="cuda")
        assert all(torch.isfinite(torch.tensor(float(row["loss"]))) for row in log)
        return
    with pytest.raises(KdcacheError, match="float16 .* needs a CUDA device"):
        train(tmp_path, small_tokens, small_targets, "fp16", dtype="float16")
    assert not (tmp_path / "fp16" / "model.safetensors").exists()


def test_unknown_dtype_is_refused():
    with pytest.raises(KdcacheError, match="dtype must be one of float32, bfloat16, float16"):
        StudentConfig(dtype="fp8")


def test_unknown_hidden_loss_is_refused():
    with pytest.raises(KdcacheError, match="hidden_loss must be one of mse, relative, got 'l1'"):
        StudentConfig(hidden_loss="l1")


def test_teacher_model_loaded_in_bfloat16_is_saved_so_and_captures(kdcache, small_tokens, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    vocab = json.loads((small_tokens / "meta.json").read_text())["vocab_size"]
    source = tmp_path / "hub_model"
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(source)
    AutoTokenizer.from_pretrained(small_tokens / "tokenizer").save_pretrained(source)
    teacher = tmp_path / "teacher"
    result = kdcache("teacher", "--tokens", small_tokens, "--out", teacher, "--model", source, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in load_file(teacher / "model.safetensors").values()} == {torch.bfloat16}
    result = kdcache("cache", "--teacher", teacher, "--tokens", small_tokens, "--out", tmp_path / "targets.zarr",
                     "--top-k", 4, "--rows-per-shard", 32, "--rows-per-chunk", 8)
    assert result.exit_code == 0, result.output


# --- command-line conveniences -------------------------------------------------------------------


def test_version(kdcache):
    from stages.cli import installed_version

    result = kdcache("--version")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"kdcache, version {installed_version()}"


def test_text_field_for_jsonl_parquet_and_hf_sources(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.corpus import iter_documents

    docs = ["first body", "second body", "third body"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d, "text": "no"}) for d in docs[:2]) + "\n")
    pq.write_table(pa.table({"body": docs[2:], "id": [7]}), tmp_path / "b.parquet")
    assert list(iter_documents(str(tmp_path), "body")) == docs
    with pytest.raises(KdcacheError, match="b.parquet has no 'text' column .* set --text-field"):
        list(iter_documents(str(tmp_path / "*.parquet")))
    with pytest.raises(KdcacheError, match=r"a.jsonl:1 has no 'content' field \(fields: \['body', 'text'\]\)"):
        list(iter_documents(str(tmp_path / "a.jsonl"), "content"))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(saved))
    assert list(iter_documents(f"hf:{saved}", "body")) == docs


def test_evaluate_on_an_explicit_device(kdcache, small_tokens, small_teacher, tmp_path):
    out = tmp_path / "metrics.json"
    result = kdcache("evaluate", "--tokens", small_tokens, "--model", f"teacher={small_teacher}", "--out", out,
                     "--device", "cpu", "--latency-rounds", 1, "--max-batches", 1)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["models"]["teacher"]["val_loss"] > 0


def test_progress_bar_shows_the_last_validation_loss(small_tokens, tmp_path, capsys):
    from pipeline.training.loop import TrainFiles

    config = StudentConfig(**{**TINY, "eval_every": 1, "eval_batches": 1})
    run_student(config, str(small_tokens), str(tmp_path / "s"), None,
                TrainFiles(val_log=str(tmp_path / "val.csv")))
    last = read_csv(tmp_path / "val.csv")[-1]
    final_line = [line for line in capsys.readouterr().err.splitlines() if "2/2 [" in line][-1]
    assert f"val_loss={float(last['val_loss']):.3f}" in final_line


# --- trackers ------------------------------------------------------------------------------------


def test_dvclive_records_every_step_beside_the_csv_logs(small_tokens, small_targets, tmp_path):
    from pipeline.training.loop import TrainFiles

    config = StudentConfig(**{**TINY, "max_steps": 3, "eval_every": 2, "eval_batches": 1})
    files = TrainFiles(log=str(tmp_path / "loss.csv"), val_log=str(tmp_path / "val.csv"),
                       live_dir=str(tmp_path / "live"))
    run_student(config, str(small_tokens), str(tmp_path / "s"), str(small_targets), files)
    losses, validation = read_csv(tmp_path / "loss.csv"), read_csv(tmp_path / "val.csv")
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["step"] == 3 and summary["loss"] == pytest.approx(float(losses[-1]["loss"]))
    assert summary["val_loss"] == pytest.approx(float(validation[-1]["val_loss"]))
    with open(tmp_path / "live" / "plots" / "metrics" / "loss.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in losses])
    with open(tmp_path / "live" / "plots" / "metrics" / "val_loss.tsv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")] == [2, 3]


def test_tensorboard_without_the_package_is_refused_by_name(small_tokens, tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        from pipeline.training.loop import TrainFiles

        with pytest.raises(KdcacheError, match="pip install tensorboard"):
            run_student(StudentConfig(**TINY), str(small_tokens), str(tmp_path / "s"), None,
                        TrainFiles(tensorboard_dir=str(tmp_path / "tb")))
        assert not (tmp_path / "s" / "model.safetensors").exists()
        return
    from pipeline.training.loop import TrainFiles

    run_student(StudentConfig(**TINY), str(small_tokens), str(tmp_path / "s"), None,
                TrainFiles(tensorboard_dir=str(tmp_path / "tb")))
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
