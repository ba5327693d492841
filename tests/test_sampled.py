"""Random-sampling KD (Anshumann et al., ACL 2025): sampled targets and their unbiased gradient."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import losses
from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig, StudentConfig
from pipeline.errors import KdcacheError
from pipeline.targets.reader import TargetsStore
from pipeline.student import run_student
from pipeline.targets import format as fmt
from pipeline.targets.format import SAMPLED_COUNTS, SAMPLED_IDS
from pipeline.teacher.signals import sample_targets, teacher_targets


class FixedTeacher(torch.nn.Module):
    """Stands in for a causal LM: the same logits (T, V) for every row of the batch."""

    def __init__(self, logits):
        super().__init__()
        self.fixed = logits

    def forward(self, input_ids, output_hidden_states=False):
        return SimpleNamespace(logits=self.fixed.expand(input_ids.shape[0], *self.fixed.shape))


def test_sample_targets_are_unique_ids_with_counts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 30, generator=g) * 3
    logits[..., 10:] = float("-inf")  # ids 10.. have probability 0
    logprobs = torch.log_softmax(logits, -1)
    n = 16
    ids, counts = sample_targets(logprobs, n, g)
    assert ids.shape == counts.shape == (3, 5, n) and ids.dtype == counts.dtype == torch.int64
    assert (counts.sum(-1) == n).all()
    assert (counts >= 0).all()
    nonzero = counts > 0
    assert (logprobs.gather(-1, ids)[nonzero] > float("-inf")).all()
    for row_ids, row_counts in zip(ids.reshape(-1, n), counts.reshape(-1, n)):
        kept = row_ids[row_counts > 0]
        assert kept.unique().numel() == kept.numel()
        # Distinct ids first, then padding (id 0, count 0).
        m = kept.numel()
        assert (row_counts[:m] > 0).all() and (row_counts[m:] == 0).all() and (row_ids[m:] == 0).all()


def test_one_hot_teacher_puts_every_draw_on_its_id():
    logprobs = torch.full((2, 3, 11), float("-inf"))
    logprobs[..., 7] = 0.0
    ids, counts = sample_targets(logprobs, 9, torch.Generator().manual_seed(1))
    assert (ids[..., 0] == 7).all() and (counts[..., 0] == 9).all()
    assert (counts[..., 1:] == 0).all() and (ids[..., 1:] == 0).all()


def test_teacher_targets_adds_samples_only_when_asked():
    g = torch.Generator().manual_seed(2)
    model = FixedTeacher(torch.randn(4, 13, generator=g))
    ids = torch.zeros(2, 4, dtype=torch.int64)
    plain = teacher_targets(model, ids, 13, top_k=3)
    assert SAMPLED_IDS not in plain and SAMPLED_COUNTS not in plain
    sampled = teacher_targets(model, ids, 13, top_k=3, num_samples=5, generator=g)
    for key in (fmt.TOPK_IDS, fmt.TOPK_LOGPROBS, fmt.TAIL_LOGMASS):
        torch.testing.assert_close(sampled[key], plain[key])
    assert sampled[SAMPLED_IDS].shape == (2, 4, 5) and (sampled[SAMPLED_COUNTS].sum(-1) == 5).all()


def test_sampled_kd_is_cross_entropy_to_the_empirical_distribution():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(6, 10, generator=g)
    ids = torch.tensor([[1, 4, 0]] * 6)
    counts = torch.tensor([[3, 1, 0]] * 6)  # padding (id 0, count 0) adds nothing
    log_q = torch.log_softmax(student / 2.0, -1)
    expected = -(0.75 * log_q[:, 1] + 0.25 * log_q[:, 4]).mean()
    assert losses.sampled_kd(student, ids, counts, temperature=2.0).item() == pytest.approx(expected.item())
    one = losses.sampled_kd(student, ids[:, :1], torch.ones(6, 1, dtype=torch.int64))
    assert one.item() == pytest.approx(F.cross_entropy(student, ids[:, 0]).item())


def test_sampled_kd_all_masked_is_zero():
    student = torch.randn(4, 10, requires_grad=True)
    ids = torch.randint(0, 10, (4, 3))
    loss = losses.sampled_kd(student, ids, torch.ones(4, 3, dtype=torch.int64),
                             mask=torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (student.grad == 0).all()


DRAWS, SAMPLES, POSITIONS, VOCAB, TOP_K = 4000, 12, 4, 20, 3


def test_sampled_kd_gradient_is_unbiased_and_top_k_is_not():
    g = torch.Generator().manual_seed(4)
    teacher_logits = torch.randn(POSITIONS, VOCAB, generator=g) * 2
    student_logits = torch.randn(POSITIONS, VOCAB, generator=g) * 2
    p = torch.softmax(teacher_logits, -1)

    # Dense forward KL(p ‖ q), mean over positions: gradient (q − p) / P.
    s = student_logits.clone().requires_grad_(True)
    F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(teacher_logits, -1), log_target=True,
             reduction="batchmean").backward()
    dense = s.grad

    # Each of the DRAWS batch rows is an independent draw of SAMPLES ids at every position.
    model = FixedTeacher(teacher_logits)
    targets = teacher_targets(model, torch.zeros(DRAWS, POSITIONS, dtype=torch.int64), VOCAB, TOP_K,
                              num_samples=SAMPLES, generator=g)
    ids = targets[SAMPLED_IDS].clone().reshape(-1, SAMPLES)  # clone: out of inference mode
    counts = targets[SAMPLED_COUNTS].clone().reshape(-1, SAMPLES)
    s = student_logits.clone().requires_grad_(True)
    # Mean over DRAWS × POSITIONS rows = mean over draws of the per-draw loss (mean over positions).
    losses.sampled_kd(s.repeat(DRAWS, 1), ids, counts).backward()
    sampled = s.grad

    # Per draw, the gradient at (position, v) is (q_v − ĉ_v / N) / P with ĉ_v ~ Binomial(N, p_v): its
    # standard deviation is sqrt(p_v (1 − p_v) / N) / P, and the mean of DRAWS draws has standard error
    # that / sqrt(DRAWS). Allow 5 standard errors, plus one draw's resolution 1 / (N · DRAWS · P) for
    # ids too rare for the normal approximation.
    std_err = (p * (1 - p) / (SAMPLES * DRAWS)).sqrt() / POSITIONS
    tolerance = 5 * std_err + 1.0 / (SAMPLES * DRAWS * POSITIONS)
    sampled_error = (sampled - dense).abs()
    assert (sampled_error <= tolerance).all(), (sampled_error / std_err).max()

    # The tail-bucket KL on the top-k of the same teacher: its gradient is biased (tail ids are pushed
    # in proportion to the student's q, not to the teacher's p), far beyond the sampling tolerance.
    s = student_logits.clone().requires_grad_(True)
    first = slice(0, POSITIONS)  # every batch row holds the same top-k targets
    losses.tail_kl(s, targets[fmt.TOPK_IDS][0, first].clone(), targets[fmt.TOPK_LOGPROBS][0, first].clone(),
                   targets[fmt.TAIL_LOGMASS][0, first].clone()).backward()
    top_k_error = (s.grad - dense).abs()
    assert top_k_error.max() > 10 * tolerance.max()  # far outside the tolerance, wherever it is widest
    assert (top_k_error / tolerance).max() > 100
    print(f"max |sampled − dense| {sampled_error.max():.2e} (≤ {(sampled_error / std_err).max():.2f} SE), "
          f"max tolerance {tolerance.max():.2e}, max |top-{TOP_K} − dense| {top_k_error.max():.2e} "
          f"(≤ {(top_k_error / std_err).max():.0f} SE)")


# --- sampled targets through the store and the student --------------------------------------------

@pytest.fixture(scope="module")
def small_teacher_dir(make_teacher):
    return make_teacher(n_layer=1, n_embd=16, max_steps=2)


def capture_sampled(teacher_dir, tokens, out, top_k, samples=12):
    config = CacheConfig(top_k=top_k, samples=samples, batch_size=64, rows_per_chunk=16, rows_per_shard=64)
    return run_capture(config, str(teacher_dir), str(tokens.path), str(out))


def test_store_holds_topk_and_sampled_targets_when_asked(small_teacher_dir, tiny_tokens, tmp_path):
    store = capture_sampled(small_teacher_dir, tiny_tokens, tmp_path / "both.zarr", top_k=8)
    assert store.array_names()[:5] == ["topk_ids", "topk_logprobs", "tail_logmass", SAMPLED_IDS, SAMPLED_COUNTS]
    stored = store.read_rows(0, store.rows)
    counts = stored[SAMPLED_COUNTS].astype(np.int64)
    assert stored[SAMPLED_COUNTS].dtype == np.uint8 and (counts.sum(-1) == 12).all()
    assert int(stored[SAMPLED_IDS].max()) < tiny_tokens.vocab_size
    again = capture_sampled(small_teacher_dir, tiny_tokens, tmp_path / "again.zarr", top_k=8)
    np.testing.assert_array_equal(again.read_rows(0, store.rows)[SAMPLED_IDS], stored[SAMPLED_IDS])  # seeded


def test_sampled_only_store_trains_a_student_and_refuses_topk(small_teacher_dir, tiny_tokens, tmp_path):
    store = capture_sampled(small_teacher_dir, tiny_tokens, tmp_path / "sampled.zarr", top_k=0)
    assert store.array_names() == [SAMPLED_IDS, SAMPLED_COUNTS]
    assert TargetsStore(store.path).bad_shards() == []
    config = StudentConfig(n_layer=1, n_embd=16, n_head=2, max_steps=2, batch_size=4, alpha=0.5)
    last = run_student(config, str(tiny_tokens.path), str(tmp_path / "student"), str(store.path))
    assert np.isfinite(last["kd"]) and last["kd"] > 0
    with pytest.raises(KdcacheError, match="holds no topk targets"):
        run_student(StudentConfig(**{**config.__dict__, "kd_signal": "topk"}), str(tiny_tokens.path),
                    str(tmp_path / "refused"), str(store.path))


def test_nothing_to_capture_is_refused():
    with pytest.raises(KdcacheError, match="nothing to capture"):
        CacheConfig(top_k=0, samples=0)
