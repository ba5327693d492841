"""Top-p trimming: which entries the teacher keeps, losses that treat the rest as absent (against dense
references, values and gradients), the padded store read back through the reader, inspect, and errors."""

import functools

import numpy as np
import pytest
import torch
import zarr

from pipeline import losses
from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig
from pipeline.errors import KdcacheError
from pipeline.training.loader import BlockStream
from pipeline.targets import ids as id_codec
from pipeline.targets import format as fmt
from pipeline.targets.format import decode_rows
from pipeline.targets.stats import summarize
from pipeline.teacher.load import load_teacher
from pipeline.teacher.signals import teacher_targets

N, V, K = 10, 40, 6


def trimmed_targets(teacher_logits, counts, k=K):
    """Top-k of softmax(teacher_logits), entries past each count absent (id 0, −inf), exact tail."""
    logprobs = torch.log_softmax(teacher_logits, -1)
    topk_logprobs, topk_ids = logprobs.topk(k, dim=-1)
    absent = torch.arange(k) >= counts.unsqueeze(-1)
    topk_logprobs, topk_ids = topk_logprobs.masked_fill(absent, float("-inf")), topk_ids.masked_fill(absent, 0)
    kept = torch.logsumexp(topk_logprobs, -1).clamp(max=0)
    return topk_ids, topk_logprobs, torch.log(-torch.expm1(kept))


@pytest.fixture
def case():
    """Teacher and student logits, with counts 1..K; position 0 keeps id 0 among its entries, the others
    do not (so padding id 0 is a real tail id there)."""
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(N, V, generator=g) * 2, torch.randn(N, V, generator=g) * 2
    teacher[0, 0] = 8.0          # id 0 is position 0's most probable id
    teacher[1:, 0] = -8.0        # and nowhere else in the top-k
    counts = torch.tensor([2, 1, 3, K, 4, 1, 5, 2, K, 3])
    return teacher, student, counts


def dense_reference(name, teacher, student, counts, temperature=1.0):
    """float64 loss of `name` built on the full vocabulary: the buckets are the kept ids and (tail_*) the
    sum of every other id, on both sides; absent entries are simply not buckets."""
    rows, vocab = teacher.shape
    p_full = torch.softmax(teacher.double(), -1)
    order = p_full.argsort(-1, descending=True)
    kept = torch.zeros(rows, vocab, dtype=torch.bool)
    for n in range(rows):
        kept[n, order[n, :counts[n]]] = True
    q_full = torch.softmax(student.double() / temperature, -1)
    p_kept, q_kept = torch.where(kept, p_full, 0), torch.where(kept, q_full, 0)
    if name.startswith("tail"):
        p = torch.cat([p_kept, 1 - p_kept.sum(-1, keepdim=True)], -1)
        q = torch.cat([q_kept, (q_full * ~kept).sum(-1, keepdim=True)], -1)
        exists = torch.cat([kept, torch.ones(rows, 1, dtype=torch.bool)], -1)
    else:  # topk_*: both sides renormalised over the kept ids
        p, q, exists = p_kept / p_kept.sum(-1, keepdim=True), q_kept / q_kept.sum(-1, keepdim=True), kept
    p = torch.where(exists, p.pow(1.0 / temperature), 0)  # capture temperature 1 → train temperature
    p = p / p.sum(-1, keepdim=True)

    def kl(a, b):
        return torch.where(exists, a * (a.clamp(min=1e-300).log() - b.clamp(min=1e-300).log()), 0).sum(-1)

    kind = name.split("_")[1]
    if kind == "kl":
        per = kl(p, q)
    elif kind == "rkl":
        per = kl(q, p)
    elif kind == "jsd":
        m = (p + q) / 2
        per = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    else:
        per = 0.5 * (p - q).abs().sum(-1)
    return per.mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", list(losses.KD_LOSS_FUNCTIONS))
def test_absent_entries_match_the_dense_reference_values_and_gradients(case, name, temperature):
    teacher, student, counts = case
    ids, logprobs, tail = trimmed_targets(teacher, counts)
    z = student.clone().requires_grad_(True)
    value = losses.KD_LOSS_FUNCTIONS[name](z, ids, logprobs, tail, temperature=temperature)
    (grad,) = torch.autograd.grad(value, z)
    z_ref = student.double().requires_grad_(True)
    ref = dense_reference(name, teacher, z_ref, counts, temperature)
    (ref_grad,) = torch.autograd.grad(ref, z_ref)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert value.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(losses.KD_LOSS_FUNCTIONS))
def test_padding_adds_exactly_nothing(case, name):
    """Every position keeps 3 of 6: the padded loss equals the loss on the 3 entries alone, gradient too."""
    teacher, student, _ = case
    ids, logprobs, tail = trimmed_targets(teacher, torch.full((N,), 3))
    fn = losses.KD_LOSS_FUNCTIONS[name]
    z1, z2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    padded = fn(z1, ids, logprobs, tail, temperature=2.0)
    short = fn(z2, ids[:, :3], logprobs[:, :3], tail, temperature=2.0)
    padded.backward(), short.backward()
    assert padded.item() == pytest.approx(short.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("vocab", [V, K + 4, K])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_ce_and_tail_kl_with_absent_entries(case, temperature, vocab):
    """The fused path equals cross_entropy + tail_kl and the dense reference (also when K = V)."""
    teacher, student, counts = case
    teacher, student = teacher[:, :vocab], student[:, :vocab]
    if vocab < V:
        teacher[1:, 0] = -8.0
    counts = counts.clamp(max=K - 1)  # K = V needs a non-empty tail to differ from the full-support path
    ids, logprobs, tail = trimmed_targets(teacher, counts)
    labels = torch.randint(0, vocab, (N,), generator=torch.Generator().manual_seed(1))
    ce_mask = torch.ones(N, dtype=torch.bool)
    ce_mask[-1] = False
    z1, z2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    ce, kd = losses.ce_and_tail_kl(z1, labels, ce_mask, ids, logprobs, tail, temperature)
    ce_ref = losses.cross_entropy(z2, labels, ce_mask)
    kd_ref = losses.tail_kl(z2, ids, logprobs, tail, temperature)
    (ce + 3 * kd).backward(), (ce_ref + 3 * kd_ref).backward()
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-6)
    assert kd.item() == pytest.approx(kd_ref.item(), rel=1e-5, abs=1e-7)
    assert torch.isfinite(z1.grad).all()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-7)
    ref = dense_reference("tail_kl", teacher, student, counts, temperature)
    assert kd.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)


# --- What the teacher keeps ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_dir(make_teacher):
    return make_teacher(n_layer=1, n_embd=16, max_steps=2)


@pytest.mark.parametrize("top_p, min_k", [(0.5, 1), (0.8, 3), (0.999, 2)])
def test_teacher_keeps_the_shortest_prefix_reaching_p(teacher_dir, tiny_tokens, top_p, min_k):
    model, _ = load_teacher(teacher_dir)
    ids = torch.from_numpy(tiny_tokens.blocks("validation")[:4].astype(np.int64))
    V_tok = tiny_tokens.vocab_size
    out = teacher_targets(model, ids, V_tok, 8, capture_temperature=0.02, top_p=top_p, min_k=min_k)
    full = teacher_targets(model, ids, V_tok, 8, capture_temperature=0.02)
    counts, probs = out[fmt.TOPK_COUNT], full[fmt.TOPK_LOGPROBS].double().exp()
    for b, t in np.ndindex(*counts.shape):
        mass, want = 0.0, 8
        for j in range(8):
            mass += float(probs[b, t, j])
            if mass >= top_p:
                want = j + 1
                break
        c = int(counts[b, t])
        assert c == max(want, min_k)
        assert torch.equal(out[fmt.TOPK_IDS][b, t, :c], full[fmt.TOPK_IDS][b, t, :c])
        assert not out[fmt.TOPK_IDS][b, t, c:].any() and torch.isneginf(out[fmt.TOPK_LOGPROBS][b, t, c:]).all()
        tail = 1 - float(probs[b, t, :c].sum())
        assert float(out[fmt.TAIL_LOGMASS][b, t].double().exp()) == pytest.approx(tail, rel=1e-4, abs=1e-6)
    assert 1 < float(counts.float().mean()) < 8 or top_p > 0.99  # the cases do trim, and not to nothing


def capture(teacher_dir, tokens, out, overwrite=False, **settings):
    config = CacheConfig(**{"top_k": 8, "top_p": 0.6, "min_k": 2, "batch_size": 64, "rows_per_chunk": 16,
                            "rows_per_shard": 64, "capture_temperature": 0.02, "split": "validation",
                            "encoding": "fp32", "device": "cpu", **settings})
    return run_capture(config, str(teacher_dir), str(tokens.path), str(out), overwrite=overwrite)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "q8d"])
def test_trimmed_store_reads_back_what_the_teacher_kept(teacher_dir, tiny_tokens, tmp_path, encoding):
    store = capture(teacher_dir, tiny_tokens, tmp_path / "t.zarr", encoding=encoding)
    assert store.attrs["top_p"] == 0.6 and store.attrs["min_k"] == 2 and store.bad_shards() == []
    assert fmt.TOPK_COUNT in store.topk_names()
    raw = store.read_rows(0, store.rows)
    counts = raw[fmt.TOPK_COUNT]
    assert counts.dtype == np.uint8 and counts.min() >= 2 and counts.max() <= 8 and 2 < counts.mean() < 8
    pad = id_codec.padding(counts, 8)
    assert not raw[fmt.TOPK_IDS][pad].any() and not raw[fmt.TOPK_LOGPROBS][pad].any()  # zeros on disk

    model, _ = load_teacher(teacher_dir)
    blocks = torch.from_numpy(tiny_tokens.blocks("validation").astype(np.int64))
    direct = teacher_targets(model, blocks, tiny_tokens.vocab_size, 8, capture_temperature=0.02, top_p=0.6, min_k=2)
    np.testing.assert_array_equal(counts, direct[fmt.TOPK_COUNT].numpy())
    decoded = decode_rows(raw, store.attrs)
    assert fmt.TOPK_COUNT not in decoded  # consumed: padding is id 0 / −inf
    assert torch.equal(decoded[fmt.TOPK_IDS], direct[fmt.TOPK_IDS])
    assert torch.equal(decoded[fmt.TAIL_LOGMASS], direct[fmt.TAIL_LOGMASS])
    got, want = decoded[fmt.TOPK_LOGPROBS], direct[fmt.TOPK_LOGPROBS]
    assert torch.equal(torch.isneginf(got), torch.from_numpy(pad))
    tolerance = {"fp32": 0.0, "fp16": 5e-3, "q8d": 3e-2}[encoding]
    assert float((got[~torch.from_numpy(pad)] - want[~torch.from_numpy(pad)]).abs().max()) <= tolerance
    item = next(iter(BlockStream(str(tiny_tokens.path), "validation", str(store.path), shuffle_buffer=1)))
    assert set(item) == {"input_ids", "row", fmt.TOPK_IDS, fmt.TOPK_LOGPROBS, fmt.TAIL_LOGMASS}

    summary = summarize(store, tail_sample_rows=store.rows)
    assert summary["kept_mean"] == pytest.approx(float(counts.mean()))
    assert summary["kept_percentiles"]["90"] == pytest.approx(float(np.percentile(counts, 90)))


def test_changing_top_p_rewrites_the_store_and_inspect_reports_kept_entries(teacher_dir, tiny_tokens, tmp_path,
                                                                           kdcache):
    out = tmp_path / "t.zarr"
    full = capture(teacher_dir, tiny_tokens, out, top_p=1.0)
    assert fmt.TOPK_COUNT not in full.topk_names() and summarize(full)["kept_mean"] == 8
    with pytest.raises(KdcacheError, match="top_p: 1.0 stored, 0.6 asked"):  # never deleted unasked
        capture(teacher_dir, tiny_tokens, out, top_p=0.6)
    trimmed = capture(teacher_dir, tiny_tokens, out, overwrite=True, top_p=0.6)  # rewritten, not resumed
    assert trimmed.attrs["top_p"] == 0.6 and fmt.TOPK_COUNT in zarr.open_group(out, mode="r")
    result = kdcache("inspect", out)
    assert result.exit_code == 0, result.output
    assert f"kept entries (top-p 0.6, min-k 2): mean {summarize(trimmed)['kept_mean']:.3g} of 8" in result.output


@pytest.mark.parametrize("settings, message", [
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_p": 0.9, "min_k": 0}, "min_k must be in [1, top_k=8]"),
    ({"top_p": 0.9, "min_k": 9}, "min_k must be in [1, top_k=8]"),
    ({"top_p": 0.9, "top_k": 0, "samples": 4}, "set top_k above 0"),
    ({"top_k": -1}, "top_k must be >= 0 and samples in [0, 255]"),         # k and N: the older checks
    ({"samples": 256}, "top_k must be >= 0 and samples in [0, 255]"),
])
def test_bad_top_p_settings_are_refused(settings, message, kdcache, tmp_path):
    with pytest.raises(KdcacheError, match=message.replace("(", r"\(").replace("[", r"\[")):
        CacheConfig(**{"top_k": 8, **settings})
    args = [a for key, value in settings.items() for a in (f"--{key.replace('_', '-')}", value)]
    result = kdcache("cache", "--teacher", tmp_path / "teacher", "--tokens", tmp_path / "tokens",
                     "--out", tmp_path / "t.zarr", *(["--top-k", 8] if "top_k" not in settings else []), *args)
    assert result.exit_code != 0 and "Traceback" not in result.output and message in result.output
    assert not (tmp_path / "t.zarr").exists()


def test_student_trains_from_a_trimmed_sqd_store(teacher_dir, tiny_tokens, tmp_path):
    """The fused tail_kl path (the default loss) on padded targets decoded from the sqd encoding."""
    from pipeline.config import StudentConfig
    from pipeline.student import run_student

    store = capture(teacher_dir, tiny_tokens, tmp_path / "t.zarr", split="train", encoding="sqd")
    assert float(store.read_rows(0, store.rows, [fmt.TOPK_COUNT])[fmt.TOPK_COUNT].mean()) < 8
    student = StudentConfig(n_layer=1, n_embd=16, n_head=2, max_steps=2, batch_size=4, alpha=0.5, device="cpu")
    last = run_student(student, str(tiny_tokens.path), str(tmp_path / "student"), str(store.path))
    assert np.isfinite(last["kd"]) and last["kd"] > 0 and np.isfinite(last["loss"])
