"""Low-rank hidden states (`cache --hidden-rank`): the basis, the coefficients, resume, verify, the student."""

import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig, StudentConfig
from pipeline.student import run_student
from pipeline.errors import KdcacheError
from pipeline.targets import basis as hidden_basis
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore
from pipeline.targets.writer import checksum
from pipeline.teacher.load import load_teacher

LAYERS = (0, 2)
FIT_ROWS = 20


@pytest.fixture(scope="module")
def teacher_dir(make_teacher):
    return make_teacher(n_layer=2, n_embd=32, max_steps=4)


def capture(teacher_dir, tokens, out, **settings):
    config = CacheConfig(**{"top_k": 4, "layers": LAYERS, "batch_size": 16, "rows_per_chunk": 4,
                            "rows_per_shard": 16, "hidden_rank": 4, "hidden_fit_rows": FIT_ROWS, **settings})
    return run_capture(config, str(teacher_dir), str(tokens.path), str(out))


@pytest.fixture(scope="module")
def dense_hidden(teacher_dir, tiny_tokens):
    """layer -> the teacher's hidden states over the whole train split, (R, T, D) float64."""
    model, _ = load_teacher(teacher_dir)
    ids = torch.from_numpy(tiny_tokens.blocks("train").astype(np.int64))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    return {layer: states[layer].double().numpy() for layer in LAYERS}


@pytest.fixture(scope="module")
def rank4(teacher_dir, tiny_tokens, tmp_path_factory):
    return capture(teacher_dir, tiny_tokens, tmp_path_factory.mktemp("rank") / "rank4.zarr")


def numpy_pca(h: np.ndarray, rank: int):
    """Reference: mean, top-`rank` eigenvectors of the (biased) covariance, kept fraction."""
    flat = h.reshape(-1, h.shape[-1])
    mean = flat.mean(0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(flat, rowvar=False, bias=True))
    return mean, eigenvectors[:, ::-1][:, :rank], eigenvalues[::-1][:rank].sum() / eigenvalues.sum()


def test_moments_fit_is_the_principal_basis_with_fixed_signs():
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    data = rng.normal(size=(500, 6)) @ np.diag([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]) @ rotation
    data += 7.0  # a large mean, as real hidden states have
    moments = hidden_basis.Moments(6)
    moments.add(torch.from_numpy(data[:123]))
    moments.add(torch.from_numpy(data[123:]).float().double())
    mean, basis, kept = moments.fit(3)
    ref_mean, ref_basis, ref_kept = numpy_pca(data, 3)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(np.abs(basis.T @ ref_basis), np.eye(3), atol=1e-5)  # same directions
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-6)
    assert kept == pytest.approx(ref_kept, rel=1e-9)
    pivots = np.abs(basis).argmax(0)
    assert (basis[pivots, range(3)] > 0).all()  # the sign convention
    flipped = hidden_basis.Moments(6)
    flipped.add(torch.from_numpy(-data))  # −h: same covariance, so the same basis, signs included
    np.testing.assert_allclose(flipped.fit(3)[1], basis, atol=1e-5)


def test_store_holds_the_basis_fitted_on_the_first_rows(rank4, dense_hidden):
    assert rank4.hidden_rank == 4 and rank4.hidden_width == 4 and rank4.attrs["hidden_fit_rows"] == FIT_ROWS
    for layer in LAYERS:
        mean, basis = rank4.hidden_basis(layer)
        assert mean.shape == (32,) and basis.shape == (32, 4) and basis.dtype == np.float32
        ref_mean, ref_basis, ref_kept = numpy_pca(dense_hidden[layer][:FIT_ROWS], 4)
        np.testing.assert_allclose(mean, ref_mean, atol=1e-4)
        np.testing.assert_allclose(np.abs(basis.T @ ref_basis), np.eye(4), atol=1e-3)
        assert rank4.attrs["hidden_variance_kept_fit"][str(layer)] == pytest.approx(ref_kept, rel=1e-4)
        assert rank4.group[fmt.hidden_array(layer)].shape == (rank4.rows, 32, 4)
    assert rank4.bad_shards() == [] and rank4.bad_unsharded() == []


def test_coefficients_reconstruct_the_hidden_states_and_the_kept_variance(rank4, dense_hidden):
    for layer in LAYERS:
        mean, basis = rank4.hidden_basis(layer)
        h = dense_hidden[layer]
        coefficients = rank4.read_rows(0, rank4.rows, [fmt.hidden_array(layer)])[fmt.hidden_array(layer)]
        exact = (h - mean) @ basis  # (R, T, P)
        np.testing.assert_allclose(coefficients, exact, rtol=2e-3, atol=2e-3)  # float16 storage
        restored = hidden_basis.reconstruct(torch.from_numpy(coefficients), mean, basis).double().numpy()
        # What is lost is exactly the part of h − μ outside the basis (plus float16 rounding).
        np.testing.assert_allclose(restored, mean + exact @ basis.T, atol=5e-3)
        residual = ((h - restored) ** 2).sum()
        kept = (exact ** 2).sum() / ((h - mean) ** 2).sum()
        assert residual == pytest.approx((1 - kept) * ((h - mean) ** 2).sum(), rel=1e-2)
        assert rank4.attrs["hidden_variance_kept"][str(layer)] == pytest.approx(kept, rel=1e-4)


def test_full_rank_reconstructs_the_hidden_states(teacher_dir, tiny_tokens, dense_hidden, tmp_path):
    store = capture(teacher_dir, tiny_tokens, tmp_path / "full.zarr", hidden_rank=32)
    for layer in LAYERS:
        mean, basis = store.hidden_basis(layer)
        coefficients = store.read_rows(0, store.rows, [fmt.hidden_array(layer)])[fmt.hidden_array(layer)]
        restored = hidden_basis.reconstruct(torch.from_numpy(coefficients), mean, basis).numpy()
        h = dense_hidden[layer]
        scale = np.abs(h).max()
        np.testing.assert_allclose(restored, h, atol=2e-3 * scale)  # float16 coefficients only
        assert store.attrs["hidden_variance_kept"][str(layer)] == pytest.approx(1.0, abs=1e-5)


def test_resume_reuses_the_stored_basis(rank4, teacher_dir, tiny_tokens, dense_hidden, tmp_path):
    """A capture killed after shard 0 resumes on the basis it stored, even one a refit would not give."""
    cut = tmp_path / "cut.zarr"
    shutil.copytree(rank4.path, cut)
    group = zarr.open_group(cut, mode="r+")
    layer = LAYERS[-1]
    basis_name, mean_name = fmt.hidden_basis_arrays(layer)
    rotation = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))[0]
    rotated = (group[basis_name][...] @ rotation).astype(np.float32)  # same span, other coefficients
    group[basis_name][...] = rotated
    group.update_attributes({"unsharded": {**group.attrs["unsharded"], basis_name: checksum(rotated)},
                             "complete": False})
    for index in range(1, len(rank4.shard_ranges)):  # only shard 0 recorded
        del group[fmt.RECORDS][fmt.record_name(index)]
    resumed = capture(teacher_dir, tiny_tokens, cut)
    assert resumed.attrs["complete"] and resumed.bad_shards() == [] and resumed.bad_unsharded() == []
    np.testing.assert_array_equal(resumed.hidden_basis(layer)[1], rotated)
    start, stop = resumed.shard_ranges[1]
    coefficients = resumed.read_rows(start, stop, [fmt.hidden_array(layer)])[fmt.hidden_array(layer)]
    mean = resumed.hidden_basis(layer)[0]
    np.testing.assert_allclose(coefficients, (dense_hidden[layer][start:stop] - mean) @ rotated, rtol=2e-3, atol=2e-3)
    first = resumed.read_rows(0, 16, [fmt.hidden_array(layer)])[fmt.hidden_array(layer)]
    np.testing.assert_array_equal(first, rank4.read_rows(0, 16, [fmt.hidden_array(layer)])[fmt.hidden_array(layer)])


def test_verify_covers_the_basis_and_cache_rewrites_it(rank4, teacher_dir, tiny_tokens, tmp_path):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(rank4.path, broken)
    mean_name = fmt.hidden_basis_arrays(LAYERS[0])[1]
    group = zarr.open_group(broken, mode="r+")
    group[mean_name][...] = group[mean_name][...] + 1.0
    with pytest.raises(KdcacheError, match=f"{mean_name} no longer match.*kdcache cache"):
        TargetsStore(broken).check_shards()
    repaired = capture(teacher_dir, tiny_tokens, broken)
    repaired.check_shards()
    np.testing.assert_array_equal(repaired.hidden_basis(LAYERS[0])[0], rank4.hidden_basis(LAYERS[0])[0])


def test_bad_ranks_are_refused_before_anything_is_written(teacher_dir, tiny_tokens, tmp_path):
    with pytest.raises(KdcacheError, match="larger than the teacher's hidden size"):
        capture(teacher_dir, tiny_tokens, tmp_path / "big.zarr", hidden_rank=33)
    assert not (tmp_path / "big.zarr").exists()
    with pytest.raises(KdcacheError, match="hidden_rank must be >= 0"):
        CacheConfig(hidden_rank=-1, layers=(1,))
    with pytest.raises(KdcacheError, match="--layer"):
        CacheConfig(hidden_rank=4)


def test_student_trains_on_the_coefficients(rank4, tiny_tokens, tmp_path):
    config = StudentConfig(n_layer=1, n_embd=16, n_head=2, max_steps=3, batch_size=4, warmup_steps=1,
                           alpha=0.5, beta=1.0, layer_map=("1:2",))
    last = run_student(config, str(tiny_tokens.path), str(tmp_path / "student"), str(rank4.path))
    assert np.isfinite(last["hidden"]) and last["hidden"] > 0
    assert (tmp_path / "student" / "model.safetensors").exists()


def test_hidden_loss_on_coefficients_is_the_full_width_loss_up_to_a_constant():
    """β·hidden on a rank-P store = full-width MSE of μ + (projection)·Bᵀ against h, minus what B leaves out."""
    from pipeline.config import ModelShape
    from pipeline.training.objective import Objective
    from pipeline.models import build_gpt2

    B, T, V, D, P = 2, 6, 30, 12, 4
    g = torch.Generator().manual_seed(0)
    model = build_gpt2(ModelShape(n_layer=1, n_embd=8, n_head=2), V, T)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64) * 3 + 1
    mean = h.reshape(-1, D).mean(0).float().numpy()
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(D, P)))[0].astype(np.float32)
    coefficients = hidden_basis.project(h.float(), mean, basis)
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=g), fmt.hidden_array(1): coefficients}
    projections = torch.nn.ModuleDict({"1": torch.nn.Linear(8, P, bias=False)})
    objective = Objective(vocab_size=V, alpha=1.0, beta=1.0, layer_pairs=[(1, 1)], projections=projections,
                          hidden_scale=P / D)
    loss = objective(model, batch)["hidden"]
    loss.backward()
    grad = projections["1"].weight.grad.clone()

    projections.zero_grad()
    student = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1]
    restored = hidden_basis.reconstruct(projections["1"](student), mean, basis)  # (B, T, D)
    full = (restored - h.float()).pow(2).mean()
    left_out = (h.float() - hidden_basis.reconstruct(coefficients, mean, basis)).pow(2).mean()
    assert loss.item() == pytest.approx((full - left_out).item(), rel=1e-4)
    full.backward()
    torch.testing.assert_close(grad, projections["1"].weight.grad, rtol=1e-4, atol=1e-6)
