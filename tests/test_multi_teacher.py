"""Several teachers: the mixture and sum losses against dense references, and multi-store training."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import losses
from pipeline.config import ModelShape, StudentConfig
from pipeline.losses import KD_LOSSES
from pipeline.student.offline import parse_targets
from pipeline.errors import KdcacheError
from pipeline.training.objective import Objective
from pipeline.models import build_gpt2
from pipeline.targets import format as fmt

N, V = 10, 30
WEIGHTS = (0.7, 0.3)


def topk_targets(teacher_logits, k, temperature=1.0):
    """(ids, log-probs, tail) as the capture writes them: tail −inf when nothing is left (k = V)."""
    logprobs = torch.log_softmax(teacher_logits / temperature, -1)
    topk_logprobs, topk_ids = logprobs.topk(k, -1)
    tail = torch.log(-torch.expm1(torch.logsumexp(topk_logprobs, -1).clamp(max=0)))
    if k >= teacher_logits.shape[-1]:
        tail = torch.full_like(tail, -math.inf)
    return topk_ids, topk_logprobs, tail


def dense_divergence(kind, p, q):
    """Reference divergences on probabilities (N, B), plain torch ops."""
    kl = lambda a, b: torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)  # noqa: E731
    m = 0.5 * (p + q)
    return {"kl": lambda: kl(p, q), "rkl": lambda: kl(q, p), "jsd": lambda: 0.5 * kl(p, m) + 0.5 * kl(q, m),
            "tv": lambda: 0.5 * (p - q).abs().sum(-1)}[kind]().mean()


@pytest.fixture
def three():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(N, V, generator=g) * 2 for _ in range(3)]  # two teachers, one student


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss", KD_LOSSES)
def test_mixture_with_full_support_is_the_dense_divergence_to_the_mixture(three, loss, temperature):
    t1, t2, student = three
    teachers = [topk_targets(t, V) for t in (t1, t2)]
    a = student.clone().requires_grad_(True)
    value = losses.mixture_kd(a, teachers, WEIGHTS, loss, temperature)
    value.backward()
    b = student.clone().requires_grad_(True)
    mixture = WEIGHTS[0] * torch.softmax(t1 / temperature, -1) + WEIGHTS[1] * torch.softmax(t2 / temperature, -1)
    dense = dense_divergence(loss.split("_")[1], mixture, torch.softmax(b / temperature, -1))
    dense.backward()
    assert value.item() == pytest.approx(dense.item(), abs=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["kl", "rkl", "jsd", "tv"])
def test_mixture_with_top_k_is_the_divergence_of_the_coarsened_mixture(three, kind):
    # Known answer: p_i zeroed outside teacher i's top-k, mixed; buckets = distinct union ids + tail.
    t1, t2, student = three
    k = 6
    teachers = [topk_targets(t, k) for t in (t1, t2)]
    value = losses.mixture_kd(student, teachers, WEIGHTS, f"tail_{kind}")
    expected = []
    for row in range(N):
        listed = [dict(zip(ids[row].tolist(), lp[row].exp().tolist())) for ids, lp, _ in teachers]
        union = sorted(set(listed[0]) | set(listed[1]))
        p = [sum(w * l.get(i, 0.0) for w, l in zip(WEIGHTS, listed)) for i in union]
        p.append(sum(w * tail[row].exp().item() for w, (_, _, tail) in zip(WEIGHTS, teachers)))
        q_full = torch.softmax(student[row], -1)
        q = q_full[union].tolist() + [1.0 - q_full[union].sum().item()]
        expected.append(dense_divergence(kind, torch.tensor([p], dtype=torch.float64),
                                         torch.tensor([q], dtype=torch.float64)))
    assert value.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4, abs=1e-6)


def test_the_union_really_overlaps_in_the_fixture(three):
    t1, t2, _ = three
    ids1, ids2 = topk_targets(t1, 6)[0], topk_targets(t2, 6)[0]
    overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids1, ids2)]
    assert max(overlap) > 0 and min(overlap) < 6  # shared ids (deduplicated) and distinct ones


@pytest.mark.parametrize("k", [6, V])
@pytest.mark.parametrize("loss", KD_LOSSES)
def test_identical_teachers_give_the_single_teacher_loss(three, loss, k):
    teacher, _, student = three
    single = topk_targets(teacher, k)
    a = student.clone().requires_grad_(True)
    losses.mixture_kd(a, [single, single], WEIGHTS, loss, temperature=2.0).backward()
    b = student.clone().requires_grad_(True)
    reference = losses.KD_LOSS_FUNCTIONS[loss](b, *single, temperature=2.0)
    reference.backward()
    assert losses.mixture_kd(student, [single, single], WEIGHTS, loss, 2.0).item() == \
        pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)


def test_absent_entries_are_left_out_of_the_mixture(three):
    # A teacher entry with log-prob −inf (a padded slot) is no bucket: its id's student mass stays in the tail.
    t1, t2, student = three
    ids, lp, tail = topk_targets(t1, 6)
    padded = (torch.cat([ids, torch.zeros_like(ids[:, :2])], -1),
              torch.cat([lp, torch.full_like(lp[:, :2], -math.inf)], -1), tail)
    other = topk_targets(t2, 6)
    for loss in KD_LOSSES:
        with_padding = losses.mixture_kd(student, [padded, other], WEIGHTS, loss)
        plain = losses.mixture_kd(student, [(ids, lp, tail), other], WEIGHTS, loss)
        assert with_padding.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-7), loss


# --- The objective with two teachers' batch keys ------------------------------------------------------

B, T = 2, 5


def batch_of(teachers_logits, k):
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=g)}
    for i, logits in enumerate(teachers_logits):
        ids, lp, tail = topk_targets(logits.reshape(B * T, V), k)
        for name, value in ((fmt.TOPK_IDS, ids), (fmt.TOPK_LOGPROBS, lp), (fmt.TAIL_LOGMASS, tail)):
            batch[fmt.teacher_key(name, i)] = value.reshape(B, T, *value.shape[1:])
    return batch


@pytest.mark.parametrize("mode", ["mixture", "sum"])
def test_objective_with_full_support_matches_the_dense_mode_definition(mode):
    g = torch.Generator().manual_seed(2)
    teachers = [torch.randn(B, T, V, generator=g) * 2 for _ in range(2)]
    batch = batch_of(teachers, V)
    model = build_gpt2(ModelShape(n_layer=1, n_embd=16, n_head=2), V, T)
    parts = Objective(vocab_size=V, alpha=0.0, temperature=1.0, teacher_weights=WEIGHTS, multi_teacher=mode)(model, batch)
    parts["loss"].backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    log_q = torch.log_softmax(model(input_ids=batch["input_ids"]).logits, -1).flatten(0, 1)
    probs = [torch.softmax(t, -1).flatten(0, 1) for t in teachers]
    if mode == "mixture":
        mixture = sum(w * p for w, p in zip(WEIGHTS, probs))
        dense = F.kl_div(log_q, mixture, reduction="batchmean")
    else:
        dense = sum(w * F.kl_div(log_q, p, reduction="batchmean") for w, p in zip(WEIGHTS, probs))
    dense.backward()
    assert parts["kd"].item() == pytest.approx(dense.item(), rel=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(got[name], parameter.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_sampled_targets_of_two_teachers_are_the_weighted_sum():
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=g)}
    per_teacher = []
    for i in range(2):
        ids = torch.randint(0, V, (B, T, 4), generator=g)
        counts = torch.randint(0, 3, (B, T, 4), generator=g)
        batch[fmt.teacher_key(fmt.SAMPLED_IDS, i)], batch[fmt.teacher_key(fmt.SAMPLED_COUNTS, i)] = ids, counts
        per_teacher.append((ids.flatten(0, 1), counts.flatten(0, 1)))
    model = build_gpt2(ModelShape(n_layer=1, n_embd=16, n_head=2), V, T)
    logits = model(input_ids=batch["input_ids"]).logits.flatten(0, 1)
    expected = sum(w * losses.sampled_kd(logits, ids, counts) for w, (ids, counts) in zip(WEIGHTS, per_teacher))
    for mode in ("mixture", "sum"):
        parts = Objective(vocab_size=V, alpha=0.5, kd_signal="sampled", teacher_weights=WEIGHTS,
                          multi_teacher=mode)(model, batch)
        assert parts["kd"].item() == pytest.approx(expected.item(), rel=1e-5)


# --- --targets PATH[:WEIGHT] --------------------------------------------------------------------------

def test_parse_targets_weights_and_paths_with_colons():
    assert parse_targets("a.zarr") == [("a.zarr", 1.0)]
    assert parse_targets(["a.zarr:0.7", "b.zarr:0.3"]) == [("a.zarr", pytest.approx(0.7)), ("b.zarr", pytest.approx(0.3))]
    assert parse_targets(["a.zarr:3", "b:c.zarr:1"]) == [("a.zarr", 0.75), ("b:c.zarr", 0.25)]
    assert parse_targets(["x:y/a.zarr", "b.zarr"]) == [("x:y/a.zarr", 0.5), ("b.zarr", 0.5)]
    assert parse_targets(None) == []


@pytest.mark.parametrize("specs, words", [
    (["a.zarr:0.7", "b.zarr"], ["every store a :WEIGHT"]),
    (["a.zarr:0", "b.zarr:1"], ["positive", "0.0"]),
    (["a.zarr:-1", "b.zarr:1"], ["positive"]),
    (["a.zarr:nan", "b.zarr:1"], ["positive"]),
])
def test_parse_targets_refuses_bad_weights(specs, words):
    with pytest.raises(KdcacheError) as error:
        parse_targets(specs)
    for word in words:
        assert word in str(error.value)


def test_multi_teacher_mode_is_validated():
    with pytest.raises(KdcacheError, match="multi_teacher must be mixture or sum"):
        StudentConfig(multi_teacher="average")


# --- `kdcache student --targets A:W --targets B:W` on two real stores --------------------------------

import csv  # noqa: E402
import json  # noqa: E402

TINY = ("--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--batch-size", "4")


def capture(kdcache, teacher, tokens, out, *options):
    result = kdcache("cache", "--teacher", teacher, "--tokens", tokens, "--out", out, "--batch-size", 64,
                     "--rows-per-chunk", 8, *options)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def second_store(kdcache, small_tokens, tmp_path_factory):
    """A store from another teacher (width 16, seed 1) over the same tokens, top-4, like small_targets' shards."""
    root = tmp_path_factory.mktemp("second")
    result = kdcache("teacher", "--tokens", small_tokens, "--out", root / "teacher", "--n-layer", 1, "--n-embd", 16,
                     "--n-head", 2, "--max-steps", 2, "--batch-size", 4, "--seed", 1)
    assert result.exit_code == 0, result.output
    return capture(kdcache, root / "teacher", small_tokens, root / "targets.zarr", "--top-k", 4,
                   "--rows-per-shard", 32, "--layer", 1)


def first_step(kdcache, tokens, out, *options):
    log = out.with_suffix(".csv")
    # τ = 2 with the one-atom tail (the defaults this test was written under): a KD term far above the
    # float32 rounding of the fused and the unfused paths.
    result = kdcache("student", "--tokens", tokens, "--out", out, "--log", log, "--max-steps", 2, "--temperature", 2,
                     "--tail-model", "atom", *TINY, *options)
    assert result.exit_code == 0, result.output
    return next(csv.DictReader(log.open()))


@pytest.mark.parametrize("mode", ["mixture", "sum"])
def test_student_from_two_teachers(kdcache, small_tokens, small_targets, second_store, tmp_path, mode):
    out = tmp_path / "student"
    both = first_step(kdcache, small_tokens, out, "--targets", f"{small_targets}:0.7", "--targets",
                      f"{second_store}:0.3", "--multi-teacher", mode, "--alpha", 0.5)
    info = json.loads((out / "kdcache.json").read_text())
    assert info["targets"] == [str(small_targets), str(second_store)]
    assert info["target_weights"] == pytest.approx([0.7, 0.3])
    assert (out / "model.safetensors").exists()
    # Same seed, same first batch: the second teacher changes the KD term; the first alone twice does not.
    alone = first_step(kdcache, small_tokens, tmp_path / "alone", "--targets", small_targets, "--alpha", 0.5)
    twice = first_step(kdcache, small_tokens, tmp_path / "twice", "--targets", small_targets, "--targets",
                       small_targets, "--multi-teacher", mode, "--alpha", 0.5)
    assert float(both["ce"]) == pytest.approx(float(alone["ce"]), rel=1e-6)
    assert float(both["kd"]) != pytest.approx(float(alone["kd"]), rel=1e-3)
    assert float(twice["kd"]) == pytest.approx(float(alone["kd"]), rel=1e-5)


def test_stores_with_other_shards_are_refused(kdcache, small_tokens, small_teacher, small_targets, tmp_path):
    other = capture(kdcache, small_teacher, small_tokens, tmp_path / "other.zarr", "--top-k", 4,
                    "--rows-per-shard", 16)
    out = tmp_path / "student"
    result = kdcache("student", "--tokens", small_tokens, "--targets", small_targets, "--targets", other,
                     "--out", out, "--max-steps", 1, *TINY)
    assert_refused(result, str(other), "rows_per_shard 16", "--rows-per-shard 32")
    assert not out.exists()


def test_store_of_another_token_store_is_named(kdcache, small_tokens, small_targets, tmp_path):
    import shutil

    import zarr

    foreign = tmp_path / "foreign.zarr"  # a real store, re-labelled as captured from other tokens
    shutil.copytree(small_targets, foreign)
    zarr.open_group(foreign, mode="r+").attrs["tokens_fingerprint"] = "0123456789abcdef"
    result = kdcache("student", "--tokens", small_tokens, "--targets", small_targets, "--targets", foreign,
                     "--out", tmp_path / "student", "--max-steps", 1, *TINY)
    assert_refused(result, str(foreign), "another token store")


def test_a_store_without_the_first_ones_kind_of_targets_is_named(kdcache, small_tokens, small_teacher,
                                                                  small_targets, tmp_path):
    sampled = capture(kdcache, small_teacher, small_tokens, tmp_path / "sampled.zarr", "--top-k", 0, "--samples", 4,
                      "--rows-per-shard", 32)
    result = kdcache("student", "--tokens", small_tokens, "--targets", small_targets, "--targets", sampled,
                     "--out", tmp_path / "student", "--max-steps", 1, *TINY)
    assert_refused(result, str(sampled), "holds no topk targets")


def test_hidden_states_from_several_teachers_are_refused(kdcache, small_tokens, small_targets, second_store, tmp_path):
    result = kdcache("student", "--tokens", small_tokens, "--targets", second_store, "--targets", small_targets,
                     "--out", tmp_path / "student", "--beta", 1.0, "--max-steps", 1, *TINY)
    assert_refused(result, "hidden-state loss", "several --targets", "beta 0")
    result = kdcache("student", "--tokens", small_tokens, "--targets", f"{small_targets}:2", "--targets",
                     second_store, "--out", tmp_path / "student", "--max-steps", 1, *TINY)
    assert_refused(result, "every store a :WEIGHT")


def assert_refused(result, *words):
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "Error:" in result.output and "Traceback" not in result.output
    for word in words:
        assert word in result.output, f"{word!r} not in:\n{result.output}"
