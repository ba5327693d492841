"""Bad input meets a clear message naming the fix, before any work: an --out that is a file or cannot
be written, a --device this machine does not have, corpus lines that are not JSON or not UTF-8, a
--plot that cannot be written. The real `kdcache` command on the small fixtures (conftest.py)."""

import json
import os
import subprocess

import pytest
import torch

from tests.test_capture_scale import SETTINGS
from tests.test_cli import SMALL_STUDENT, assert_nothing_complete, assert_refused

PREPARE = ("--vocab-size", 300, "--block-size", 32, "--val-fraction", 0.3)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be written under, root included: a read-only tmpfs mounted there (root
    ignores permission bits), or, for another user, one without write permission."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"root needs a read-only mount for a read-only directory: {mounted.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def stage_args(small_corpus, small_tokens, small_teacher, small_targets):
    """The arguments of each command that writes a store or a model, but its --out."""
    return {
        "prepare": ("--corpus", small_corpus, *PREPARE),
        "teacher": ("--tokens", small_tokens, "--n-layer", 1, "--n-embd", 16, "--n-head", 2, "--max-steps", 1),
        "cache": ("--teacher", small_teacher, "--tokens", small_tokens, *SETTINGS),
        "student": ("--tokens", small_tokens, "--targets", small_targets, "--max-steps", 1, *SMALL_STUDENT),
    }


@pytest.mark.parametrize("command", ["prepare", "teacher", "cache", "student"])
def test_an_out_that_is_a_file_is_refused_before_any_work(kdcache, stage_args, command, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a directory")
    result = kdcache(command, *stage_args[command], "--out", out, "--log", tmp_path / "log.csv") \
        if command in ("teacher", "student") else kdcache(command, *stage_args[command], "--out", out)
    assert_refused(result, f"--out {out} is a file", "choose another --out")
    assert out.read_text() == "not a directory" and not (tmp_path / "log.csv").exists()


@pytest.mark.parametrize("command", ["prepare", "teacher", "cache", "student"])
def test_a_read_only_out_is_refused_before_any_work(kdcache, stage_args, command, read_only_dir, tmp_path):
    out = read_only_dir / "out"
    extra = ("--log", tmp_path / "log.csv") if command in ("teacher", "student") else ()
    result = kdcache(command, *stage_args[command], "--out", out, *extra)
    reason = "read-only file system" if os.geteuid() == 0 else "permission denied"
    assert_refused(result, f"cannot write to --out {out}", reason)
    assert "loss=" not in result.output and not (tmp_path / "log.csv").exists()  # no training step ran
    assert_nothing_complete(out)


@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:0"])
def test_a_device_this_machine_lacks_is_refused_before_any_work(kdcache, stage_args, device, tmp_path):
    if device != "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    expected = ("unknown --device 'gpu'", "`cuda`") if device == "gpu" else \
        (f"--device {device}: CUDA is not available", "--device cpu")
    for command in ("teacher", "cache", "student"):
        out = tmp_path / command
        result = kdcache(command, *stage_args[command], "--out", out, "--device", device)
        assert_refused(result, *expected)
        assert_nothing_complete(out)


def write_corpus(root, **files):
    root.mkdir()
    for name, data in files.items():
        (root / name.replace("_", ".")).write_bytes(data)
    return root


def prepare_refused_then_skipping(kdcache, corpus, first_bad: str):
    """`prepare` stops naming `first_bad` (FILE:LINE why) and leaves nothing; with --skip-bad-lines it
    finishes. Returns the second run's output and its token store's `skipped_lines`."""
    out = corpus.parent / "tokens"
    result = kdcache("prepare", "--corpus", corpus, "--out", out, *PREPARE)
    assert_refused(result, first_bad, "--skip-bad-lines")
    assert_nothing_complete(out)
    result = kdcache("prepare", "--corpus", corpus, "--out", out, *PREPARE, "--skip-bad-lines")
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "meta.json").read_text())["skipped_lines"]


def jsonl(small_corpus, documents) -> bytes:
    return b"".join(json.dumps({"text": (small_corpus / f"doc{i:02d}.txt").read_text()}).encode() + b"\n"
                    for i in documents)


def test_a_jsonl_line_that_is_not_json_is_named_or_skipped(kdcache, small_corpus, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs_jsonl=jsonl(small_corpus, range(2)) + b'{"text": "cut off\n'
                          + jsonl(small_corpus, range(2, 24)))
    first_bad = f"{corpus / 'docs.jsonl'}:3 is not JSON"
    output, skipped = prepare_refused_then_skipping(kdcache, corpus, first_bad)
    assert f"skipped 1 bad lines (--skip-bad-lines); the first: {first_bad}" in output and skipped == 1


def test_a_file_that_is_not_utf8_is_named_or_skipped(kdcache, small_corpus, tmp_path):
    text = (small_corpus / "doc00.txt").read_bytes() + (small_corpus / "doc01.txt").read_bytes()
    lines = jsonl(small_corpus, range(2, 24))
    corpus = write_corpus(tmp_path / "corpus", a_txt=b"first line\n" + "café au lait\n".encode("latin-1") + text,
                          b_jsonl=lines[:100] + b"\xff" + lines[100:])
    _, skipped = prepare_refused_then_skipping(kdcache, corpus, f"{corpus / 'a.txt'}:2 is not UTF-8 text")
    assert skipped == 2  # a.txt:2 and b.jsonl:1


def test_an_inspect_plot_that_cannot_be_written_names_its_path(kdcache, small_targets, read_only_dir):
    plot = read_only_dir / "tail.svg"
    assert_refused(kdcache("inspect", small_targets, "--plot", plot), f"cannot write --plot {plot}")
    assert not plot.exists()
