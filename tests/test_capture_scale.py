"""The capture as a user meets it at scale: resume from any kill point, one writer at a time, settings
that do not match refused, stores at fsspec URLs. The real `kdcache` command on the small fixtures."""

import json
import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import zarr

from pipeline.targets import format as fmt
from pipeline.targets.lock import LOCK_NAME
from pipeline.targets.reader import TargetsStore

SETTINGS = ("--top-k", 8, "--batch-size", 64, "--rows-per-shard", 32, "--rows-per-chunk", 8)  # = small_targets


@pytest.fixture
def cache(kdcache, small_teacher, small_tokens):
    def run(out, *extra):
        return kdcache("cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", out, *SETTINGS, *extra)
    return run


@pytest.fixture
def copy(small_targets, tmp_path):
    """A copy of the small capture, complete."""
    out = tmp_path / "copy.zarr"
    shutil.copytree(small_targets, out)
    return out


def assert_same_store(path, reference):
    a, b = TargetsStore(path), TargetsStore(reference)
    assert a.records == b.records  # same checksums, shard by shard
    for name in b.array_names():
        np.testing.assert_array_equal(a.read_rows(0, b.rows, [name])[name], b.read_rows(0, b.rows, [name])[name])


def test_a_store_killed_before_its_arrays_existed_resumes(kdcache, cache, small_targets, tmp_path):
    out = tmp_path / "s.zarr"
    out.mkdir()
    attrs = {**zarr.open_group(small_targets, mode="r").attrs, "complete": False}
    (out / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}))
    shown = kdcache("inspect", out)
    assert shown.exit_code == 0 and "INCOMPLETE (0/" in shown.output and "missing arrays" in shown.output
    assert kdcache("verify", out).exit_code == 1
    result = cache(out)
    assert result.exit_code == 0, result.output
    assert_same_store(out, small_targets)
    assert kdcache("verify", out).exit_code == 0


def test_verify_refuses_a_store_never_marked_complete(kdcache, copy):
    zarr.open_group(copy, mode="r+").update_attributes({"complete": False})
    result = kdcache("verify", copy)
    assert result.exit_code == 1 and "never marked complete" in result.output


def test_other_settings_are_refused_and_overwrite_is_asked_for(cache, copy, small_targets):
    result = cache(copy, "--top-k", 4)
    assert result.exit_code == 1 and "top_k: 8 stored, 4 asked" in result.output and "--overwrite" in result.output
    assert_same_store(copy, small_targets)  # untouched, still complete
    result = cache(copy, "--top-k", 4, "--overwrite")
    assert result.exit_code == 0, result.output
    assert TargetsStore(copy).top_k == 4 and TargetsStore(copy).group[fmt.TOPK_IDS].shape[-1] == 4


def write_lock(store, **holder):
    (store / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                               "started": time.time(), **holder}))


def test_a_second_writer_is_refused_naming_the_holder(cache, copy):
    zarr.open_group(copy, mode="r+").update_attributes({"complete": False})
    write_lock(copy)  # a live process of this host: this one
    result = cache(copy, "--top-k", 4)  # another capture with other settings, as in the issue
    assert result.exit_code == 1
    assert f"being written by another capture (host {socket.gethostname()}, pid {os.getpid()}" in result.output
    assert not TargetsStore(copy, require_complete=False).attrs["complete"] and (copy / LOCK_NAME).exists()
    write_lock(copy, host="elsewhere")  # cannot be checked from here: refused, unless --force
    assert "--force" in cache(copy).output
    result = cache(copy, "--force")
    assert result.exit_code == 0 and "--force: taking over the lock" in result.output
    assert TargetsStore(copy).attrs["complete"] and not (copy / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over(cache, copy, small_targets):
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_lock(copy, pid=gone.pid)
    result = cache(copy)
    assert result.exit_code == 0 and "taking over the stale lock" in result.output
    assert not (copy / LOCK_NAME).exists()
    assert_same_store(copy, small_targets)


def test_fsspec_urls_are_stores_not_local_directories(kdcache, cache, small_targets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"memory://{tmp_path.name}/m.zarr"
    result = cache(url)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == []  # no local `memory:` directory
    assert_same_store(url, small_targets)
    # A kill on the object store: shard 1's record lost, `complete` not yet written. Re-run resumes it.
    group = zarr.open_group(url, mode="r+")
    group.update_attributes({"complete": False})
    del group[fmt.RECORDS][fmt.record_name(1)]
    assert kdcache("verify", url).exit_code == 1
    result = cache(url)
    assert result.exit_code == 0 and "resuming: 4 of 5 shards done" in result.output
    assert kdcache("verify", url).exit_code == 0 and "bytes/token" in kdcache("inspect", url).output
    result = cache(f"file://{tmp_path}/f.zarr")
    assert result.exit_code == 0 and (tmp_path / "f.zarr" / "zarr.json").exists()


def test_a_url_whose_package_is_missing_is_refused_before_any_work(cache, tmp_path):
    result = cache("oci://bucket/t.zarr")
    assert result.exit_code == 1 and "Install ocifs" in result.output


def test_an_out_that_is_a_file_is_refused(cache, tmp_path):
    (tmp_path / "t.zarr").write_text("not a store")
    result = cache(tmp_path / "t.zarr")
    assert result.exit_code == 1 and "is a file" in result.output
