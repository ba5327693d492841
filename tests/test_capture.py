"""The capture: a real (tiny) teacher with a padded vocabulary, run once, against dense reference math."""

import json
import shutil
import threading

import numpy as np
import pytest
import torch
import zarr

from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig
from pipeline.errors import KdcacheError
from pipeline.targets import codecs
from pipeline.targets import format as fmt
from pipeline.targets.format import decode_rows
from pipeline.targets.reader import TargetsStore
from pipeline.teacher.load import load_teacher
from pipeline.teacher.signals import teacher_targets


@pytest.fixture(scope="module")
def teacher_dir(make_teacher):
    return make_teacher(n_layer=2, n_embd=32, max_steps=4)


def capture(teacher_dir, tokens, out, **settings):
    config = CacheConfig(**{"top_k": 8, "layers": (0, 2), "batch_size": 16, "rows_per_chunk": 4,
                            "rows_per_shard": 16, "encoding": "fp32", **settings})
    return run_capture(config, str(teacher_dir), str(tokens.path), str(out))


def test_padded_teacher_targets_cover_the_tokenizer_only(teacher_dir, tiny_tokens):
    model, info = load_teacher(teacher_dir)
    V = tiny_tokens.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == 320 > V == 300  # padded like real models
    assert info["fingerprint"] and info["num_layers"] == 2
    ids = torch.from_numpy(tiny_tokens.blocks("train")[:3].astype(np.int64))
    out = teacher_targets(model, ids, V, top_k=8, layers=(2,))
    dense = torch.log_softmax(model(input_ids=ids).logits[..., :V].float(), -1)
    expected, expected_ids = dense.topk(8, -1)
    torch.testing.assert_close(out[fmt.TOPK_LOGPROBS], expected)
    assert torch.equal(out[fmt.TOPK_IDS], expected_ids) and int(out[fmt.TOPK_IDS].max()) < V
    mass = out[fmt.TOPK_LOGPROBS].exp().sum(-1) + out[fmt.TAIL_LOGMASS].exp()
    torch.testing.assert_close(mass, torch.ones_like(mass))
    assert out[fmt.hidden_array(2)].shape == (3, tiny_tokens.block_size, 32)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_targets_are_the_tempered_distribution_at_the_capture_temperature(teacher_dir, tiny_tokens, tau):
    model, _ = load_teacher(teacher_dir)
    V = tiny_tokens.vocab_size
    ids = torch.from_numpy(tiny_tokens.blocks("train")[:2].astype(np.int64))
    out = teacher_targets(model, ids, V, top_k=8, capture_temperature=tau)
    dense = torch.log_softmax(model(input_ids=ids).logits[..., :V].float() / tau, -1)
    torch.testing.assert_close(out[fmt.TOPK_LOGPROBS], dense.topk(8, -1).values)
    tail = torch.log1p(-dense.topk(8, -1).values.exp().sum(-1))
    torch.testing.assert_close(out[fmt.TAIL_LOGMASS], tail, rtol=1e-4, atol=1e-5)


def test_store_holds_what_the_teacher_says(teacher_dir, tiny_tokens, tmp_path):
    store = capture(teacher_dir, tiny_tokens, tmp_path / "t.zarr")
    assert store.rows == tiny_tokens.num_rows("train") and store.layers == [0, 2]
    model, _ = load_teacher(teacher_dir)
    rows = slice(17, 20)
    ids = torch.from_numpy(tiny_tokens.blocks("train")[rows].astype(np.int64))
    direct = teacher_targets(model, ids, tiny_tokens.vocab_size, 8, layers=(0, 2))
    stored = store.read_rows(rows.start, rows.stop)
    np.testing.assert_array_equal(stored[fmt.TOPK_IDS], direct[fmt.TOPK_IDS].numpy())
    np.testing.assert_allclose(stored[fmt.TOPK_LOGPROBS], direct[fmt.TOPK_LOGPROBS].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored[fmt.hidden_array(2)], direct[fmt.hidden_array(2)].numpy(), rtol=1e-2, atol=1e-2)
    assert store.attrs["teacher_fingerprint"] == json.loads((teacher_dir / "kdcache.json").read_text())["fingerprint"]


def test_bfloat16_hidden_states_keep_the_teacher_within_bfloat16_rounding(teacher_dir, tiny_tokens, tmp_path):
    store = capture(teacher_dir, tiny_tokens, tmp_path / "t.zarr", hidden_dtype="bfloat16")
    assert store.attrs["hidden_dtype"] == "bfloat16" and store.group[fmt.hidden_array(2)].dtype == np.uint16
    model, _ = load_teacher(teacher_dir)
    ids = torch.from_numpy(tiny_tokens.blocks("train")[17:20].astype(np.int64))
    direct = teacher_targets(model, ids, tiny_tokens.vocab_size, 8, layers=(2,))[fmt.hidden_array(2)]
    decoded = decode_rows(store.read_rows(17, 20, [fmt.hidden_array(2)]), store.attrs)[fmt.hidden_array(2)]
    # Round to nearest: at most half a unit in the 8th significant bit, relative.
    assert torch.all((decoded - direct).abs() <= direct.abs() * 2.0**-8 + 1e-30)
    assert not torch.equal(decoded, direct)  # it did round


def test_an_unknown_hidden_dtype_is_refused():
    with pytest.raises(KdcacheError, match="hidden_dtype must be one of float16, bfloat16"):
        CacheConfig(hidden_dtype="int8")
    assert set(codecs.HIDDEN_DTYPES) == {"float16", "bfloat16"}  # the dtypes the config accepts


def test_interrupted_capture_resumes_to_identical_arrays(teacher_dir, tiny_tokens, tmp_path):
    whole = capture(teacher_dir, tiny_tokens, tmp_path / "whole.zarr")
    # An interruption after two shards: what a killed run leaves (later shards never recorded).
    cut = tmp_path / "cut.zarr"
    shutil.copytree(whole.path, cut)
    group = zarr.open_group(cut, mode="r+")
    group.attrs["complete"] = False
    for index in range(2, len(whole.shard_ranges)):  # garbage where the unfinished shards were
        start, stop = whole.shard_ranges[index]
        group[fmt.TOPK_IDS][start:stop] = 0
        del group[fmt.RECORDS][fmt.record_name(index)]
    resumed = capture(teacher_dir, tiny_tokens, cut)
    assert resumed.attrs["complete"] and resumed.bad_shards() == []
    for name in whole.array_names():
        np.testing.assert_array_equal(resumed.read_rows(0, whole.rows)[name], whole.read_rows(0, whole.rows)[name])


def stored_arrays(store):
    return store.read_rows(0, store.rows), {i: r["checksums"] for i, r in store.records.items()}


def test_the_background_writer_writes_the_same_store(teacher_dir, tiny_tokens, tmp_path):
    settings = {"samples": 5, "top_p": 0.9, "batch_size": 5}  # 4 batches per shard, the last ragged
    background = capture(teacher_dir, tiny_tokens, tmp_path / "background.zarr", **settings)
    inline = capture(teacher_dir, tiny_tokens, tmp_path / "inline.zarr", background_writer=False, **settings)
    (arrays, sums), (expected, expected_sums) = stored_arrays(background), stored_arrays(inline)
    assert set(arrays) == set(expected) and fmt.SAMPLED_IDS in arrays and sums == expected_sums
    for name in expected:
        np.testing.assert_array_equal(arrays[name], expected[name])
    assert background.attrs["complete"] and background.bad_shards() == []


def test_an_error_in_the_writer_fails_the_capture_and_leaves_its_shard_unrecorded(teacher_dir, tiny_tokens,
                                                                                  tmp_path, monkeypatch):
    out, threads = tmp_path / "t.zarr", set()
    encode = fmt.encode_targets

    def failing(targets, identity):  # the 3rd batch of 16 rows: the first batch of shard 2
        threads.add(threading.current_thread().name)
        failing.calls += 1
        if failing.calls == 3:
            raise OSError("disk full")
        return encode(targets, identity)

    failing.calls = 0
    monkeypatch.setattr(fmt, "encode_targets", failing)
    with pytest.raises(OSError, match="disk full"):
        capture(teacher_dir, tiny_tokens, out)
    assert threads == {"capture-writer"}  # it did fail on the writer's thread
    group = zarr.open_group(out, mode="r")
    assert not group.attrs["complete"] and sorted(group[fmt.RECORDS].group_keys()) == [fmt.record_name(i)
                                                                                      for i in range(2)]
    monkeypatch.setattr(fmt, "encode_targets", encode)
    resumed = capture(teacher_dir, tiny_tokens, out)
    whole = capture(teacher_dir, tiny_tokens, tmp_path / "whole.zarr", background_writer=False)
    assert resumed.attrs["complete"] and stored_arrays(resumed)[1] == stored_arrays(whole)[1]
