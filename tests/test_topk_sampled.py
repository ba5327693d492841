"""kd_signal topk_sampled: the cached top-k, with the tail's shape taken from the sampled ids of the same
store. Exact on the top-k, unbiased in the tail: its gradient matches dense KD's in expectation, where the
one-bucket tail's does not."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import losses
from pipeline.config import StudentConfig
from pipeline.errors import KdcacheError
from pipeline.student import run_student
from pipeline.targets import format as fmt
from pipeline.teacher.signals import teacher_targets
from test_sampled import FixedTeacher, capture_sampled

VOCAB, POSITIONS, TOP_K, SAMPLES, DRAWS = 40, 6, 4, 16, 4000


def dense_kl(teacher_logits, student_logits):
    return F.kl_div(torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1),
                    log_target=True, reduction="batchmean")


def targets_of(teacher_logits, draws, top_k=TOP_K, samples=SAMPLES, seed=0):
    g = torch.Generator().manual_seed(seed)
    positions = teacher_logits.shape[0]
    t = teacher_targets(FixedTeacher(teacher_logits), torch.zeros(draws, positions, dtype=torch.int64),
                        teacher_logits.shape[-1], top_k, num_samples=samples, generator=g)
    names = (fmt.TOPK_IDS, fmt.TOPK_LOGPROBS, fmt.TAIL_LOGMASS, fmt.SAMPLED_IDS, fmt.SAMPLED_COUNTS)
    return [t[name].clone().flatten(0, 1) for name in names]


def test_with_the_whole_vocabulary_in_the_top_k_it_is_dense_kl():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(POSITIONS, VOCAB, generator=g) * 2, torch.randn(POSITIONS, VOCAB, generator=g)
    loss = losses.topk_sampled_kd(student.double(), *targets_of(teacher, 1, top_k=VOCAB))
    torch.testing.assert_close(loss.double(), dense_kl(teacher.double(), student.double()), atol=1e-5, rtol=1e-5)


def test_without_tail_draws_it_is_the_one_bucket_tail_kl():
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(POSITIONS, VOCAB, generator=g), torch.randn(POSITIONS, VOCAB, generator=g)
    ids, logprobs, tail, sampled, counts = targets_of(teacher, 1)
    inside = (sampled.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1)
    no_tail_draws = torch.where(inside, counts, 0)  # keep only the draws inside each position's top-k
    torch.testing.assert_close(losses.topk_sampled_kd(student, ids, logprobs, tail, sampled, no_tail_draws),
                               losses.tail_kl(student, ids, logprobs, tail))


def test_gradient_matches_dense_kd_in_expectation_and_beats_the_tail_bucket():
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(POSITIONS, VOCAB, generator=g) * 1.5  # a heavy tail beyond the top-4
    student = torch.randn(POSITIONS, VOCAB, generator=g)
    s = student.clone().requires_grad_(True)
    dense_kl(teacher, s).backward()
    dense = s.grad

    ids, logprobs, tail, sampled, counts = targets_of(teacher, DRAWS)
    s = student.clone().requires_grad_(True)
    losses.topk_sampled_kd(s.repeat(DRAWS, 1), ids, logprobs, tail, sampled, counts).backward()
    hybrid_error = (s.grad - dense).abs().max()  # the mean over DRAWS copies: the mean per-draw gradient

    s = student.clone().requires_grad_(True)
    losses.tail_kl(s, ids[:POSITIONS], logprobs[:POSITIONS], tail[:POSITIONS]).backward()
    bucket_error = (s.grad - dense).abs().max()
    # Sampling noise of the mean of 4000 draws is ~1e-4 here; the bucket's bias is systematic.
    print(f"max |hybrid − dense| {hybrid_error:.2e}, max |bucket − dense| {bucket_error:.2e}")
    assert hybrid_error < 1.5e-3 < bucket_error / 10, (hybrid_error, bucket_error)


@pytest.fixture(scope="module")
def both_store(make_teacher, tiny_tokens, tmp_path_factory):
    teacher = make_teacher(n_layer=1, n_embd=16, max_steps=2)
    return capture_sampled(teacher, tiny_tokens, tmp_path_factory.mktemp("both") / "both.zarr", top_k=8)


def test_a_student_trains_on_topk_sampled_and_refuses_another_temperature(both_store, tiny_tokens, tmp_path):
    config = StudentConfig(n_layer=1, n_embd=16, n_head=2, max_steps=2, batch_size=4, alpha=0.5,
                           kd_signal="topk_sampled")
    last = run_student(config, str(tiny_tokens.path), str(tmp_path / "student"), str(both_store.path))
    assert np.isfinite(last["kd"]) and last["kd"] > 0
    with pytest.raises(KdcacheError, match="trains at the capture temperature"):
        run_student(StudentConfig(**{**config.__dict__, "temperature": 2.0}), str(tiny_tokens.path),
                    str(tmp_path / "refused"), str(both_store.path))
    with pytest.raises(KdcacheError, match="forward KL"):
        run_student(StudentConfig(**{**config.__dict__, "loss": "tail_jsd"}), str(tiny_tokens.path),
                    str(tmp_path / "refused2"), str(both_store.path))
