"""Encodings of top-k log-probs: round trips and their error bounds, the invariants every decoding keeps
(sorted, mass ≤ 1), a real capture in each encoding read back through the reader, and the CLI refusal."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig
from pipeline.errors import KdcacheError
from pipeline.training.loader import BlockStream
from pipeline.targets import codecs
from pipeline.targets import ids as id_codec
from pipeline.targets import format as fmt
from pipeline.targets.format import decode_rows
from pipeline.targets.reader import TargetsStore
from stages.cli import cli

NAMES = list(codecs.ENCODINGS)
VALUE_NAMES = [name for name, entry in codecs.ENCODINGS.items() if not entry.owns_ids]  # values only
ROOT = Path(__file__).resolve().parents[1]


def realistic_logprobs(shape=(4, 64), V=1000, K=32, temperature=1.0, seed=0) -> np.ndarray:
    """Top-K of log_softmax(logits / temperature), sorted descending, for random logits."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, V, generator=gen) * 3.0
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.topk(K, dim=-1, sorted=True).values.numpy()


def mixed_logprobs(seed=0) -> np.ndarray:
    """Sharp, ordinary and flat positions side by side."""
    return np.concatenate([realistic_logprobs(temperature=t, seed=seed + i) for i, t in enumerate((0.3, 1.0, 2.5))])


def distinct_ids(shape, vocab=300, seed=0) -> np.ndarray:
    """Random ids, distinct within each position: (..., K) int64, one from each of K equal id ranges,
    in random order."""
    rng, K = np.random.default_rng(seed), shape[-1]
    width = vocab // K
    ids = rng.integers(0, width, shape) + np.arange(K) * width
    return np.take_along_axis(ids, np.argsort(rng.random(shape), -1), -1)


def round_trip(name, x, ids=None, count=None, ids_dtype="uint16"):
    """Encode (random distinct ids when none are given) and decode through the reader → (stored, values)."""
    ids = distinct_ids(x.shape) if ids is None else ids
    stored = fmt.encode_topk(torch.from_numpy(ids), torch.from_numpy(x), name, ids_dtype,
                                None if count is None else torch.from_numpy(count))
    attrs = {"encoding": name, "ids_dtype": ids_dtype, "top_k": x.shape[-1]}
    return stored, decode_rows(stored, attrs)[fmt.TOPK_LOGPROBS].numpy()


def test_registry_is_consistent():
    """Each entry declares the arrays it writes; the reader finds the encoding from them alone."""
    x = realistic_logprobs()
    T, K = x.shape[1:]
    params = [fmt.params_array(n) for n, e in codecs.ENCODINGS.items() if e.has_params]
    assert len(set(params)) == len(params) and all(p.startswith(fmt.TOPK_LOGPROBS + "_") for p in params)
    for name in VALUE_NAMES:
        entry = codecs.ENCODINGS[name]
        _, text = entry  # (dtype, description), as `kdcache encodings` lists them
        assert text and "\n" not in text
        by_role = entry.encode(x)
        specs = entry.arrays(T, K)
        names = fmt.topk_role_names(name)
        stored = {names[role]: array for role, array in by_role.items()}
        assert list(by_role) == list(specs) and list(stored) == fmt.topk_value_names(name)
        for role, (row_shape, dtype) in specs.items():
            assert by_role[role].shape == (x.shape[0], *row_shape) and by_role[role].dtype == dtype
        assert fmt.find_encoding(stored)[1] is entry
    listed = CliRunner().invoke(cli, ["encodings"])
    assert listed.exit_code == 0 and all(name in listed.output for name in NAMES)


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_round_trip_error_bounds(name):
    x = mixed_logprobs()
    entry = codecs.ENCODINGS[name]
    stored, decoded = round_trip(name, x)
    assert decoded.dtype == np.float32 and decoded.shape == x.shape
    raw = entry._decode({codecs.VALUES: stored[fmt.TOPK_LOGPROBS],  # before the mass cap
                         codecs.PARAMS: stored.get(fmt.params_array(name))})  # (by role), which only lowers a position by its excess mass
    excess = np.maximum(np.logaddexp.reduce(raw.astype(np.float64), axis=-1, keepdims=True), 0)
    np.testing.assert_allclose(decoded, raw - excess if entry.lossy else raw, rtol=1e-6, atol=1e-6)
    err = np.abs(raw - x)
    assert (excess <= err.max(-1, keepdims=True) + 1e-6).all()  # so decoded errors are at most twice these
    if name == "fp32":
        np.testing.assert_array_equal(decoded, x)
    elif name == "fp16":
        assert (err <= 2.0**-11 * np.abs(x) + 1e-7).all()                     # ~5e-4 relative
    elif name == "bf16":
        exact = torch.from_numpy(x).to(torch.bfloat16).float().numpy()     # torch rounds to nearest even
        np.testing.assert_array_equal(raw, exact)
        assert (err <= 2.0**-8 * np.abs(x)).all()                          # ~4e-3 relative
    else:  # q8, q8d: within half a grid step, or float16 rounding of the first value at the top
        offset, step = np.moveaxis(stored[fmt.params_array(name)].astype(np.float32), -1, 0)
        bound = np.maximum(step / 2, 2.0**-11 * np.abs(x[..., 0]))[..., None] + 1e-6
        assert (err <= bound).all()
        assert (step <= (x[..., 0] - x[..., -1]) / 255 * 1.01 + 1e-6).all()  # the grid spans this position only
        assert err.max() <= codecs.QUANT_RANGE / 255 / 2 + 1e-3 and err.mean() < 0.01
    if name == "q8d":  # exactly q8's values, in other bytes
        np.testing.assert_array_equal(decoded, round_trip("q8", x)[1])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["ordinary", "sharp", "whole_vocabulary", "tiny_k"])
def test_decoded_are_sorted_and_hold_at_most_all_the_mass(name, case):
    x = {"ordinary": mixed_logprobs(seed=5),
         "sharp": realistic_logprobs(temperature=0.05, seed=7),              # top-1 ≈ 1, tail ≈ 0
         "whole_vocabulary": realistic_logprobs(V=40, K=40, seed=9),         # Σ exp = 1: rounding overshoots
         "tiny_k": realistic_logprobs(K=1, seed=11)}[case]
    _, decoded = round_trip(name, x)
    assert np.isfinite(decoded).all()
    assert (np.diff(decoded, axis=-1) <= 0).all()
    assert (np.exp(decoded.astype(np.float64)).sum(-1) <= 1 + 1e-6).all()


@pytest.mark.parametrize("name", VALUE_NAMES)
def test_degenerate_positions_decode_without_nan(name):
    """Equal values (zero grid step), -inf entries (fully masked ids) and an all -inf position."""
    x = np.array([[[-2.0, -2.0, -2.0, -2.0], [-0.1, -3.0, -np.inf, -np.inf], [-np.inf] * 4]], np.float32)
    _, decoded = round_trip(name, x)
    assert not np.isnan(decoded).any()
    np.testing.assert_allclose(decoded[0, 0], -2.0, atol=0.01)
    np.testing.assert_allclose(decoded[0, 1, :2], [-0.1, -3.0], atol=codecs.QUANT_RANGE / 255 / 2 + 1e-3)
    assert (decoded[0, 1, 2:] < -29).all() and (decoded[0, 2] == -np.inf).all()


def by_id(ids, values):
    """Entries of each position in increasing id order: compares encodings that reorder ties."""
    ids, values = np.asarray(ids), np.asarray(values)
    order = np.argsort(ids, -1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(values, order, -1)


@pytest.mark.parametrize("vocab", [300, 152_064])
@pytest.mark.parametrize("trimmed", [False, True])
def test_sqd_keeps_every_id_with_its_value_within_half_a_step_of_sqrt_p(vocab, trimmed):
    x = mixed_logprobs(seed=4)
    ids = distinct_ids(x.shape, vocab, seed=vocab)
    ids[0, 0, :2] = vocab - 1, 0
    count = np.random.default_rng(1).integers(1, x.shape[-1] + 1, x.shape[:-1]) if trimmed else None
    layout = id_codec.ids_dtype(vocab)
    stored = fmt.encode_topk(torch.from_numpy(ids), torch.from_numpy(x), "sqd", layout,
                                None if count is None else torch.from_numpy(count))
    decoded = decode_rows(stored, {"encoding": "sqd", "ids_dtype": layout, "top_k": x.shape[-1]})
    got_ids, got = decoded[fmt.TOPK_IDS].numpy(), decoded[fmt.TOPK_LOGPROBS].numpy()
    pad = id_codec.padding(x.shape[-1] if count is None else count, x.shape[-1])
    want_ids, want = np.where(pad, 0, ids), np.where(pad, -np.inf, x)
    np.testing.assert_array_equal(got_ids[..., 0], ids[..., 0])   # the top-1 id is exact,
    assert (got[..., 0] > np.where(pad, -np.inf, got)[..., 1:].max(-1)).all()  # and strictly first
    with np.errstate(invalid="ignore"):  # −inf − −inf is NaN between padded entries
        assert not (np.diff(got, axis=-1) > 0).any()
    assert (np.exp(got.astype(np.float64)).sum(-1) <= 1 + 1e-6).all()
    got_ids, got = by_id(got_ids, got)
    want_ids, want = by_id(want_ids, want)
    np.testing.assert_array_equal(got_ids, want_ids)               # every kept id, once
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    err = np.abs(np.exp(got / 2) - np.exp(want / 2))                 # in √p: ≤ STEP/2 (+ the mass cap)
    L = codecs.SqrtDeltaIds.levels(x.shape[-1])
    assert L == 32 and (stored[fmt.TOPK_LOGPROBS] <= L).all()
    assert err.max() <= 1 / (2 * L) + 4e-3  # + the mass cap (lowers a position by its excess)


def test_sqd_levels_grow_with_k_so_the_kl_cost_per_position_does_not():
    assert [codecs.SqrtDeltaIds.levels(k) for k in (1, 8, 32, 128, 2048, 4096)] == [6, 16, 32, 64, 255, 255]
    x = realistic_logprobs(V=2048, K=128, seed=2)
    _, decoded = round_trip("sqd", x, ids=distinct_ids(x.shape, 2048))
    err = np.abs(np.exp(np.sort(decoded, -1) / 2) - np.exp(np.sort(x, -1) / 2))  # k-th largest vs k-th largest
    assert err.max() <= 1 / (2 * 64) + 4e-3


def test_sqd_stores_the_top_id_then_increasing_ids_as_differences():
    x = realistic_logprobs(shape=(1, 1), K=5)
    ids = np.array([[[40, 7, 300, 12, 99]]])
    stored = fmt.encode_topk(torch.from_numpy(ids), torch.from_numpy(x), "sqd", "uint16")
    np.testing.assert_array_equal(stored[fmt.TOPK_IDS][0, 0], [40, 7, 5, 87, 201])  # 40 | 7, 12, 99, 300
    with pytest.raises(KdcacheError, match="ids and values together"):
        decode_rows({fmt.TOPK_LOGPROBS: stored[fmt.TOPK_LOGPROBS]}, {"encoding": "sqd"})
    with pytest.raises(KdcacheError, match="ids and values together"):
        decode_rows({fmt.TOPK_IDS: stored[fmt.TOPK_IDS]}, {"encoding": "sqd", "ids_dtype": "uint16"})
    with pytest.raises(KdcacheError, match="encode_topk"):
        codecs.ENCODINGS["sqd"].encode(x)


def test_quantised_values_cannot_be_decoded_without_their_parameters():
    stored = codecs.ENCODINGS["q8"].encode(realistic_logprobs())
    with pytest.raises(KdcacheError, match="topk_logprobs_q8"):
        decode_rows({fmt.TOPK_LOGPROBS: stored[codecs.VALUES]})


@pytest.mark.parametrize("vocab, K", [(300, 32), (152_064, 32), (2048, 128)])
def test_format_md_recipe_decodes_like_the_reader(tmp_path, vocab, K):
    """The plain numpy + zarr decoders printed in docs/FORMAT.md agree with decode_rows, for every
    encoding, uint16 and bit-packed ids, untrimmed and top-p trimmed (padded) positions."""
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    scope = {"np": np}
    for function in ("read_ids", "read_topk_logprobs"):  # read_topk follows read_topk_logprobs
        exec(re.search(rf"```python\n(def {function}.*?)```", text, re.S).group(1), scope)
    x = mixed_logprobs(seed=3) if K == 32 else realistic_logprobs(V=vocab, K=K, seed=3)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, vocab, x.shape))
    ids[0, 0, 0], ids[0, 0, 1] = vocab - 1, 0
    layout = id_codec.ids_dtype(vocab)
    for trimmed in (False, True):
        count = torch.from_numpy(rng.integers(1, x.shape[-1] + 1, x.shape[:-1])) if trimmed else None
        for name in NAMES:
            stored = fmt.encode_topk(ids, torch.from_numpy(x), name, layout, count)
            attrs = {"encoding": name, "ids_dtype": layout, "top_k": x.shape[-1]}
            group = zarr.open_group(tmp_path / f"{name}-{trimmed}-{vocab}.zarr", mode="w", attributes=attrs)
            for array_name, array in stored.items():
                group.create_array(array_name, data=array)
            expected = decode_rows(stored, attrs)
            got_ids, got = scope["read_topk"](group, slice(None))
            np.testing.assert_allclose(got, expected[fmt.TOPK_LOGPROBS].numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(got_ids, expected[fmt.TOPK_IDS].numpy())
            if trimmed:
                assert np.isneginf(expected[fmt.TOPK_LOGPROBS].numpy()).sum() == (x.shape[-1] - count.numpy()).sum()


# --- A real capture in every encoding -----------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_dir(make_teacher):
    return make_teacher(n_layer=1, n_embd=16, max_steps=2)


def capture(teacher_dir, tokens, out, encoding):
    # Temperature 0.1 spreads the untrained teacher's near-uniform log-probs over several nats.
    config = CacheConfig(top_k=8, batch_size=64, rows_per_chunk=16, rows_per_shard=64, capture_temperature=0.1,
                         split="validation", encoding=encoding, device="cpu")
    return run_capture(config, str(teacher_dir), str(tokens.path), str(out))


@pytest.fixture(scope="module")
def reference(teacher_dir, tiny_tokens, tmp_path_factory):
    store = capture(teacher_dir, tiny_tokens, tmp_path_factory.mktemp("encodings") / "fp32.zarr", "fp32")
    return store, decode_rows(store.read_rows(0, store.rows))


CAPTURE_TOLERANCE = {"fp32": 0.0, "fp16": 5e-3, "bf16": 4e-2, "q8": 3e-2, "q8d": 3e-2,
                     "sqd": 1 / (2 * codecs.SqrtDeltaIds.levels(8)) + 4e-3}  # sqd: in √p, matched by id


@pytest.mark.parametrize("name", NAMES)
def test_capture_in_each_encoding_reads_back_close_to_fp32(name, teacher_dir, tiny_tokens, reference, tmp_path):
    ref_store, ref = reference
    store = capture(teacher_dir, tiny_tokens, tmp_path / f"{name}.zarr", name)
    assert store.attrs["encoding"] == name and store.rows == ref_store.rows
    assert store.array_names()[:len(fmt.topk_value_names(name)) + 1] == [fmt.TOPK_IDS, *fmt.topk_value_names(name)]
    assert store.bad_shards() == []  # the parameter array is checksummed like every other
    decoded = decode_rows(store.read_rows(0, store.rows), store.attrs)
    assert set(decoded) == set(ref)  # parameter arrays are consumed by decoding
    assert torch.equal(decoded[fmt.TAIL_LOGMASS], ref[fmt.TAIL_LOGMASS])  # float32, from the true values
    got, want = decoded[fmt.TOPK_LOGPROBS], ref[fmt.TOPK_LOGPROBS]
    assert got.dtype == torch.float32 and got.shape == want.shape
    if codecs.ENCODINGS[name].owns_ids:  # ties may swap places: compare entries by id, values in √p
        assert torch.equal(decoded[fmt.TOPK_IDS][..., 0], ref[fmt.TOPK_IDS][..., 0])
        got_ids, got_v = by_id(decoded[fmt.TOPK_IDS], got)
        want_ids, want_v = by_id(ref[fmt.TOPK_IDS], want)
        np.testing.assert_array_equal(got_ids, want_ids)
        assert float(np.abs(np.exp(got_v / 2) - np.exp(want_v / 2)).max()) <= CAPTURE_TOLERANCE[name]
    else:
        assert torch.equal(decoded[fmt.TOPK_IDS], ref[fmt.TOPK_IDS])
        assert float((got - want).abs().max()) <= CAPTURE_TOLERANCE[name]
    assert bool((got.diff(dim=-1) <= 0).all()) and float(got.double().exp().sum(-1).max()) <= 1 + 1e-6
    # The student's loader reads the store with every array it names and yields decoded rows.
    item = next(iter(BlockStream(str(tiny_tokens.path), "validation", str(store.path), shuffle_buffer=1)))
    assert set(item) == {"input_ids", "row", *ref} and item[fmt.TOPK_LOGPROBS].dtype == torch.float32


def test_cache_refuses_an_unknown_encoding(tmp_path):
    result = CliRunner().invoke(cli, ["cache", "--teacher", tmp_path / "teacher", "--tokens", tmp_path / "tokens",
                                      "--out", tmp_path / "t.zarr", "--encoding", "nope"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "Error: unknown encoding 'nope'" in result.output and all(n in result.output for n in NAMES)
    assert not (tmp_path / "t.zarr").exists()


def test_student_trains_from_a_quantised_store(teacher_dir, tiny_tokens, tmp_path):
    from pipeline.config import StudentConfig
    from pipeline.student import run_student

    config = CacheConfig(top_k=8, batch_size=64, rows_per_chunk=16, rows_per_shard=64, encoding="q8d", device="cpu")
    store = run_capture(config, str(teacher_dir), str(tiny_tokens.path), str(tmp_path / "q8d.zarr"))
    student = StudentConfig(n_layer=1, n_embd=16, n_head=2, max_steps=2, batch_size=4, alpha=0.5)
    last = run_student(student, str(tiny_tokens.path), str(tmp_path / "student"), str(store.path))
    assert np.isfinite(last["kd"]) and last["kd"] > 0
