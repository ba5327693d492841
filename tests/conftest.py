"""Shared tiny fixtures: a real corpus (a few stdlib modules) and a real token store built from it."""

import inspect
import json

import numpy as np
import pytest

from pipeline.config import PrepareConfig
from pipeline.data.tokens import prepare_tokens
from pipeline.targets import format as fmt
from pipeline.targets.writer import TargetsWriter


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A directory of .txt documents: the source of a few standard-library modules."""
    import csv, heapq, json as json_module, shlex, string, textwrap

    root = tmp_path_factory.mktemp("corpus")
    for module in (csv, heapq, json_module, shlex, string, textwrap):
        (root / f"{module.__name__}.txt").write_text(inspect.getsource(module))
    return root


@pytest.fixture(scope="session")
def tiny_tokens(tiny_corpus, tmp_path_factory):
    """A token store: BPE vocabulary 300, blocks of 32 tokens."""
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    config = PrepareConfig(corpus=str(tiny_corpus), vocab_size=300, block_size=32, val_fraction=0.2)
    return prepare_tokens(config, out)


@pytest.fixture(scope="session")
def store_path(tiny_tokens, tmp_path_factory):
    """A real targets store whose tail_logmass of row r is r at every position (to check the join)."""
    rows, T = tiny_tokens.num_rows("train"), tiny_tokens.block_size
    identity = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
                "tokens_fingerprint": tiny_tokens.fingerprint, "teacher_fingerprint": "t", "split": "train",
                "rows": rows, "block_size": T, "vocab_size": tiny_tokens.vocab_size, "capture_temperature": 1.0,
                "top_k": 2, "encoding": "fp32", "ids_dtype": "uint16", "layers": [], "hidden_size": 4,
                "hidden_dtype": "float16", "rows_per_chunk": 2, "rows_per_shard": 4, "teacher_num_layers": 1,
                "samples": 0, "seed": 0}
    specs = {fmt.TOPK_IDS: ((T, 2), "uint16"), fmt.TOPK_LOGPROBS: ((T, 2), "float32"),
             fmt.TAIL_LOGMASS: ((T,), "float32")}
    path = tmp_path_factory.mktemp("loader") / "targets.zarr"
    writer = TargetsWriter(path, identity, specs)
    for i, (start, stop) in enumerate(writer.ranges):
        n = stop - start
        writer.write_shard(i, {fmt.TOPK_IDS: np.zeros((n, T, 2), np.uint16),
                               fmt.TOPK_LOGPROBS: np.zeros((n, T, 2), np.float32),
                               fmt.TAIL_LOGMASS: np.repeat(np.arange(start, stop, dtype=np.float32)[:, None], T, 1)})
    writer.finish()
    return path


# --- The `kdcache` command line on a really small pipeline (tests/test_cli.py) -----------------------
# Few KB of text so that the CLI's capture and training stay fast: tiny_tokens above is too big for that.

SMALL_TEACHER = ("--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--max-steps", "3", "--batch-size", "4")


@pytest.fixture(scope="session")
def kdcache():
    """Run `kdcache ARGS...` in-process (click's CliRunner); returns the click Result."""
    from click.testing import CliRunner

    from stages.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    return run


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """24 .txt documents of 500 characters: about 12 KB of standard-library source."""
    import shlex
    import textwrap

    text = inspect.getsource(textwrap) + inspect.getsource(shlex)
    root = tmp_path_factory.mktemp("small_corpus")
    for i in range(24):
        (root / f"doc{i:02d}.txt").write_text(text[i * 500:(i + 1) * 500])
    return root


def prepare_small(kdcache, small_corpus, out, vocab_size: int = 300, block_size: int = 32, *extra):
    """`kdcache prepare` of the small corpus (validation fraction 0.3) to `out`; returns `out`."""
    result = kdcache("prepare", "--out", out, "--corpus", small_corpus, "--vocab-size", vocab_size,
                     "--block-size", block_size, "--val-fraction", 0.3, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def small_tokens(kdcache, small_corpus, tmp_path_factory):
    """`kdcache prepare`: vocabulary 300, blocks of 32 tokens. Returns the store's path."""
    return prepare_small(kdcache, small_corpus, tmp_path_factory.mktemp("small") / "tokens")


@pytest.fixture(scope="session")
def small_teacher(kdcache, small_tokens, tmp_path_factory):
    """`kdcache teacher`: the default teacher, 1 layer of width 32, trained for 3 steps."""
    out = tmp_path_factory.mktemp("small") / "teacher"
    result = kdcache("teacher", "--tokens", small_tokens, "--out", out, *SMALL_TEACHER)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def small_targets(kdcache, small_tokens, small_teacher, tmp_path_factory):
    """`kdcache cache`: top-8 log-probs in shards of 32 rows (several shards)."""
    out = tmp_path_factory.mktemp("small") / "targets.zarr"
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", out,
                     "--top-k", 8, "--batch-size", 64, "--rows-per-shard", 32, "--rows-per-chunk", 8)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def make_teacher(tiny_tokens, tmp_path_factory):
    """Train (a few steps) and save a default teacher on `tiny_tokens`; vocabulary padded 300 -> 320."""
    from pipeline.config import TeacherConfig
    from pipeline.training.teacher import materialise_teacher

    def make(n_layer: int, n_embd: int, max_steps: int):
        out = tmp_path_factory.mktemp("teacher") / "teacher"
        config = TeacherConfig(n_layer=n_layer, n_embd=n_embd, n_head=2, max_steps=max_steps, batch_size=4,
                               vocab_multiple=64)
        materialise_teacher(config, str(tiny_tokens.path), str(out))
        return out

    return make
