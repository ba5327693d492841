"""The targets store on disk: round trip, ragged last shard, resume, checks, corruption."""

import numpy as np
import pytest
import zarr

from pipeline.errors import KdcacheError
from pipeline.targets import format as fmt
from pipeline.targets.format import decode_rows
from pipeline.targets.reader import TargetsStore
from pipeline.targets.writer import TargetsWriter

T, K, D = 6, 4, 5


def identity(rows=21, **overrides):
    base = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "tokens_fingerprint": "tok",
            "teacher_fingerprint": "teach", "split": "train", "rows": rows, "block_size": T,
            "vocab_size": 300, "capture_temperature": 1.0, "top_k": K, "encoding": "fp32", "ids_dtype": "uint16",
            "layers": [1], "hidden_size": D, "hidden_dtype": "float16", "rows_per_chunk": 2,
            "rows_per_shard": 8, "teacher_num_layers": 2, "samples": 0, "seed": 0}
    return {**base, **overrides}


SPECS = {fmt.TOPK_IDS: ((T, K), "uint16"), fmt.TOPK_LOGPROBS: ((T, K), "float32"),
         fmt.TAIL_LOGMASS: ((T,), "float32"), fmt.hidden_array(1): ((T, D), "float16")}


def fake_rows(rows, seed=0):
    rng = np.random.default_rng(seed)
    return {fmt.TOPK_IDS: rng.integers(0, 300, (rows, T, K)).astype(np.uint16),
            fmt.TOPK_LOGPROBS: -rng.random((rows, T, K)).astype(np.float32) * 5,
            fmt.TAIL_LOGMASS: -rng.random((rows, T)).astype(np.float32),
            fmt.hidden_array(1): rng.standard_normal((rows, T, D)).astype(np.float16)}


def write_all(path, data, ident):
    writer = TargetsWriter(path, ident, SPECS)
    for i in writer.pending():
        start, stop = writer.ranges[i]
        writer.write_shard(i, {n: a[start:stop] for n, a in data.items()})
    writer.finish()
    return writer


def test_round_trip_with_ragged_last_shard(tmp_path):
    data = fake_rows(21)  # shards of 8: 8, 8, 5
    write_all(tmp_path / "t.zarr", data, identity())
    store = TargetsStore(tmp_path / "t.zarr")
    assert store.shard_ranges == [(0, 8), (8, 16), (16, 21)]
    for name, array in data.items():
        np.testing.assert_array_equal(store.read_rows(0, 21)[name], array)
    np.testing.assert_array_equal(store.read_rows(16, 21)[fmt.TOPK_IDS], data[fmt.TOPK_IDS][16:])
    decoded = decode_rows(store.read_rows(3, 5))
    assert decoded[fmt.TOPK_IDS].dtype.is_floating_point is False
    np.testing.assert_allclose(decoded[fmt.hidden_array(1)].numpy(), data[fmt.hidden_array(1)][3:5].astype(np.float32))
    assert store.bad_shards() == []
    # Plain zarr reads it too, with the documented names and attributes.
    group = zarr.open_group(tmp_path / "t.zarr", mode="r")
    assert group.attrs["complete"] is True and group[fmt.TOPK_IDS].shape == (21, T, K)


def test_interrupted_store_is_not_complete_and_resumes(tmp_path):
    data = fake_rows(21)
    path = tmp_path / "t.zarr"
    writer = TargetsWriter(path, identity(), SPECS)
    writer.write_shard(0, {n: a[0:8] for n, a in data.items()})  # then "killed"
    with pytest.raises(KdcacheError, match="unfinished capture"):
        TargetsStore(path)
    resumed = TargetsWriter(path, identity(), SPECS)
    assert resumed.pending() == [1, 2]
    for i in resumed.pending():
        start, stop = resumed.ranges[i]
        resumed.write_shard(i, {n: a[start:stop] for n, a in data.items()})
    resumed.finish()
    np.testing.assert_array_equal(TargetsStore(path).read_rows(0, 21)[fmt.TOPK_LOGPROBS], data[fmt.TOPK_LOGPROBS])


def test_store_with_other_identity_is_refused_then_overwritten_on_request(tmp_path):
    path = tmp_path / "t.zarr"
    data = fake_rows(21)
    write_all(path, data, identity())
    with pytest.raises(KdcacheError, match=r"teacher_fingerprint: 'teach' stored, 'other' asked.*--overwrite"):
        TargetsWriter(path, identity(teacher_fingerprint="other"), SPECS)
    kept = TargetsStore(path)  # untouched: still complete, same arrays
    np.testing.assert_array_equal(kept.read_rows(0, 21)[fmt.TOPK_IDS], data[fmt.TOPK_IDS])
    writer = TargetsWriter(path, identity(teacher_fingerprint="other"), SPECS, overwrite=True)
    assert writer.pending() == [0, 1, 2]
    assert not zarr.open_group(path, mode="r").attrs["complete"]


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(KdcacheError, match="not a targets store"):
        TargetsWriter(tmp_path, identity(), SPECS)
    assert (tmp_path / "precious.txt").exists()


def test_fingerprint_and_vocabulary_and_layer_checks(tmp_path, tiny_tokens):
    rows = tiny_tokens.num_rows("train")
    path = tmp_path / "t.zarr"
    write_all(path, fake_rows(rows), identity(rows=rows, tokens_fingerprint=tiny_tokens.fingerprint))
    store = TargetsStore(path)
    store.check_compatible(tiny_tokens, "train", 300, [1])
    with pytest.raises(KdcacheError, match="vocabulary"):
        store.check_compatible(tiny_tokens, "train", 301)
    with pytest.raises(KdcacheError, match=r"layers \[3\]"):
        store.check_compatible(tiny_tokens, "train", 300, [1, 3])
    other = tmp_path / "other.zarr"
    write_all(other, fake_rows(rows), identity(rows=rows, tokens_fingerprint="someone-else"))
    with pytest.raises(KdcacheError, match="another token store"):
        TargetsStore(other).check_compatible(tiny_tokens)


def test_other_format_version_is_refused_with_advice(tmp_path):
    path = tmp_path / "t.zarr"
    write_all(path, fake_rows(9), identity(rows=9))
    group = zarr.open_group(path, mode="r+")
    group.attrs["format_version"] = 99
    with pytest.raises(KdcacheError, match="version 99.*Re-run `kdcache cache`"):
        TargetsStore(path)


def test_corrupted_shard_is_named(tmp_path):
    path = tmp_path / "t.zarr"
    write_all(path, fake_rows(21), identity())
    shard_file = path / fmt.TOPK_LOGPROBS / "c" / "1" / "0" / "0"  # second shard of rows
    raw = bytearray(shard_file.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard_file.write_bytes(bytes(raw))
    assert TargetsStore(path).bad_shards() == [1]


def shard_file(path, name, index):
    return path / name / "c" / str(index) / "0" / "0"  # shard `index` of rows of a 3-d array


@pytest.mark.parametrize("damage", ["flip_near_end", "truncate_half"])
def test_damaged_shard_index_is_named_and_repaired_by_a_rerun(tmp_path, damage):
    """The shard index sits at the end of a zarr shard file: zarr refuses to merge a write into it."""
    path, data = tmp_path / "t.zarr", fake_rows(21)
    write_all(path, data, identity())
    target = shard_file(path, fmt.TOPK_LOGPROBS, 1)
    raw = bytearray(target.read_bytes())
    if damage == "flip_near_end":
        raw[-6] ^= 0xFF
    else:
        del raw[len(raw) // 2:]
    target.write_bytes(bytes(raw))
    assert TargetsStore(path).bad_shards() == [1]
    writer = TargetsWriter(path, identity(), SPECS)  # the re-run: forgets shard 1 ...
    assert writer.pending() == [1] and not TargetsStore(path, require_complete=False).attrs["complete"]
    start, stop = writer.ranges[1]
    writer.write_shard(1, {n: a[start:stop] for n, a in data.items()})  # ... and rewrites it
    writer.finish()
    store = TargetsStore(path)
    assert store.bad_shards() == []
    np.testing.assert_array_equal(store.read_rows(0, 21)[fmt.TOPK_LOGPROBS], data[fmt.TOPK_LOGPROBS])


def test_each_shard_is_recorded_by_an_object_of_its_own(tmp_path):
    path, data = tmp_path / "t.zarr", fake_rows(21)
    write_all(path, data, identity())
    group = zarr.open_group(path, mode="r")
    assert "shards" not in group.attrs and group.attrs["format_version"] == fmt.FORMAT_VERSION == 4
    records = group[fmt.RECORDS]
    assert sorted(records.group_keys()) == [fmt.record_name(i) for i in range(3)]
    record = dict(records[fmt.record_name(2)].attrs)
    assert record["shard"] == 2 and record["rows"] == [16, 21]
    assert set(record["checksums"]) == set(SPECS)


def test_a_store_with_every_record_but_no_complete_is_finished_by_a_rerun(tmp_path):
    """Killed between the last record and `complete`: not complete, nothing to re-capture."""
    path, data = tmp_path / "t.zarr", fake_rows(21)
    writer = TargetsWriter(path, identity(), SPECS)
    for i in writer.pending():
        start, stop = writer.ranges[i]
        writer.write_shard(i, {n: a[start:stop] for n, a in data.items()})
    with pytest.raises(KdcacheError, match="unfinished capture"):
        TargetsStore(path)
    with pytest.raises(KdcacheError, match="never marked complete"):
        TargetsStore(path, require_complete=False).verify()
    again = TargetsWriter(path, identity(), SPECS)
    assert again.pending() == []
    again.finish()
    TargetsStore(path).verify()


def make_version_3(path):
    """Turn a store written now into what format version 3 wrote: records in the attributes."""
    group = zarr.open_group(path, mode="r+")
    records = group[fmt.RECORDS]
    shards = {str(records[name].attrs["shard"]): records[name].attrs["checksums"] for name in records.group_keys()}
    del group[fmt.RECORDS]
    group.update_attributes({"format_version": 3, "shards": shards})
    return shards


def test_a_version_3_store_is_read_verified_and_resumed(tmp_path):
    path, data = tmp_path / "t.zarr", fake_rows(21)
    write_all(path, data, identity())
    shards = make_version_3(path)
    store = TargetsStore(path)
    assert store.attrs["format_version"] == 3 and store.bad_shards() == [] and len(store.records) == 3
    store.verify()
    # An unfinished version-3 capture: shard 2 never recorded.
    zarr.open_group(path, mode="r+").update_attributes(
        {"complete": False, "shards": {k: v for k, v in shards.items() if k != "2"}})
    assert TargetsStore(path, require_complete=False).bad_shards() == [2]
    writer = TargetsWriter(path, identity(), SPECS)  # resumes it, as a version-4 store
    assert writer.pending() == [2]
    writer.write_shard(2, {n: a[16:21] for n, a in data.items()})
    writer.finish()
    resumed = TargetsStore(path)
    assert resumed.attrs["format_version"] == 4 and "shards" not in resumed.attrs
    assert resumed.bad_shards() == [] and resumed.records["0"]["checksums"] == shards["0"]
    np.testing.assert_array_equal(resumed.read_rows(0, 21)[fmt.TOPK_IDS], data[fmt.TOPK_IDS])
