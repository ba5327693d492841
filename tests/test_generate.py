"""`kdcache generate`: the teacher writes a token store (sequence-level KD) — decoding, the store, resume,
refusals — and `prepare --mix` combines stores.

Tiny real models (GPT-2 built from a config, or the conftest's default teachers) on real token stores.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import GenerateConfig, PrepareConfig
from pipeline.data.mix import mix_token_stores
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.models import fingerprint_model_dir
from pipeline.teacher.generate import draw_prompts, generate_batch, run_generate, sample_next
from tests.test_cli import assert_nothing_complete, assert_refused, tokens_block_64  # noqa: F401 (a fixture)


def tiny_gpt2(vocab_size=64, n_positions=32, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def generators(seed, count):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(count)]


def test_greedy_with_kv_cache_equals_step_by_step_greedy_decoding():
    model = tiny_gpt2(vocab_size=64)
    prompts = torch.randint(0, 60, (3, 5), generator=torch.Generator().manual_seed(1))
    vocab = 60  # the model has 64 output rows; only the tokenizer's 60 ids may be drawn
    # The reference: the whole sequence through the model at every step, argmax of the last position.
    expected = prompts.clone()
    with torch.no_grad():
        for _ in range(10):
            logits = model(input_ids=expected).logits[:, -1, :vocab]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
    for kv_cache in (True, False):
        got = generate_batch(model, prompts, 10, vocab, 0.0, 1.0, generators(0, 3), kv_cache=kv_cache)
        assert torch.equal(got, expected), kv_cache
    assert got.max() < vocab


def test_sampling_is_deterministic_under_a_seed_and_independent_of_the_batch():
    model = tiny_gpt2()
    prompts = torch.randint(0, 64, (4, 3), generator=torch.Generator().manual_seed(2))
    first = generate_batch(model, prompts, 12, 64, 1.0, 0.9, generators(0, 4))
    again = generate_batch(model, prompts, 12, 64, 1.0, 0.9, generators(0, 4))
    without_cache = generate_batch(model, prompts, 12, 64, 1.0, 0.9, generators(0, 4), kv_cache=False)
    other_seed = generate_batch(model, prompts, 12, 64, 1.0, 0.9, generators(1, 4))
    assert torch.equal(first, again) and torch.equal(first, without_cache)
    assert not torch.equal(first, other_seed)
    # Row 2 decoded alone, with its own generator, writes what it wrote inside the batch of four.
    alone = generate_batch(model, prompts[2:3], 12, 64, 1.0, 0.9, generators(0, 4)[2:3])
    assert torch.equal(alone[0], first[2])


def test_top_p_draws_from_the_renormalised_nucleus_only():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    ids = sample_next(logits, 1.0, 0.7, generators(3, 4000))
    counts = torch.bincount(ids, minlength=4).double() / 4000
    # Nucleus at 0.7: {0, 1} (the mass before id 1 is 0.5 < 0.7; before id 2 it is 0.8), renormalised.
    assert counts[2] == 0 and counts[3] == 0
    assert abs(counts[0] - 0.5 / 0.8) < 0.03
    full = torch.bincount(sample_next(logits, 1.0, 1.0, generators(3, 4000)), minlength=4).double() / 4000
    assert torch.allclose(full, probs.double(), atol=0.03)
    hot = torch.bincount(sample_next(logits, 2.0, 1.0, generators(3, 4000)), minlength=4).double() / 4000
    tempered = probs.double() ** 0.5 / (probs.double() ** 0.5).sum()
    assert torch.allclose(hot, tempered, atol=0.03)


def test_prompts_are_seeded_windows_of_the_train_split():
    blocks = np.arange(5 * 8).reshape(5, 8)
    prompts = draw_prompts(blocks, 20, 3, seed=4)
    assert prompts.shape == (20, 3)
    np.testing.assert_array_equal(prompts, draw_prompts(blocks, 20, 3, seed=4))
    assert not np.array_equal(prompts, draw_prompts(blocks, 20, 3, seed=5))
    for window in prompts:  # consecutive tokens of one row
        assert window[0] // 8 == window[-1] // 8 and np.all(np.diff(window) == 1)


@pytest.fixture(scope="module")
def teacher_dir(make_teacher):
    return make_teacher(1, 32, 3)


CONFIG = GenerateConfig(prompts=10, prompt_tokens=4, max_new_tokens=12, batch_size=4, temperature=1.0, seed=3)


def test_generated_store_is_a_token_store_with_provenance(teacher_dir, tiny_tokens, tmp_path):
    store = run_generate(CONFIG, str(teacher_dir), str(tiny_tokens.path), str(tmp_path / "gen"))
    reopened = TokenStore(tmp_path / "gen")
    assert reopened.block_size == tiny_tokens.block_size and reopened.vocab_size == tiny_tokens.vocab_size
    assert reopened.load_tokenizer().get_vocab() == tiny_tokens.load_tokenizer().get_vocab()
    # 10 sequences of 4 + 12 tokens, each followed by EOS, packed into blocks of 32.
    assert reopened.num_rows("train") == 10 * 17 // 32
    train = reopened.blocks("train").reshape(-1)
    np.testing.assert_array_equal(train[:4], draw_prompts(tiny_tokens.blocks("train"), 10, 4, 3)[0])
    assert train[16] == tiny_tokens.meta["eos_id"] and train.max() < tiny_tokens.vocab_size
    np.testing.assert_array_equal(reopened.blocks("validation"), tiny_tokens.blocks("validation"))
    generated = reopened.meta["generated"]
    assert generated["teacher_fingerprint"] == fingerprint_model_dir(teacher_dir)
    assert generated["source_fingerprint"] == tiny_tokens.fingerprint
    assert reopened.meta["settings"]["max_new_tokens"] == 12 and reopened.meta["settings"]["top_p"] == 1.0
    assert reopened.fingerprint != tiny_tokens.fingerprint
    assert not (tmp_path / "gen.partial-generate").exists() and store.fingerprint == reopened.fingerprint


def test_a_killed_generation_resumes_to_the_same_rows(teacher_dir, tiny_tokens, tmp_path):
    whole = run_generate(CONFIG, str(teacher_dir), str(tiny_tokens.path), str(tmp_path / "whole"))
    cut = tmp_path / "cut"
    assert run_generate(CONFIG, str(teacher_dir), str(tiny_tokens.path), str(cut), stop_after_batches=2) is None
    assert not cut.exists()  # nothing that looks finished
    assert len(list((tmp_path / "cut.partial-generate").glob("batch-*.npy"))) == 2
    resumed = run_generate(CONFIG, str(teacher_dir), str(tiny_tokens.path), str(cut))
    np.testing.assert_array_equal(resumed.blocks("train"), whole.blocks("train"))
    assert resumed.fingerprint == whole.fingerprint


def test_changed_settings_start_over(teacher_dir, tiny_tokens, tmp_path):
    out = tmp_path / "gen"
    run_generate(CONFIG, str(teacher_dir), str(tiny_tokens.path), str(out), stop_after_batches=1)
    greedy = dataclasses.replace(CONFIG, temperature=0.0)
    store = run_generate(greedy, str(teacher_dir), str(tiny_tokens.path), str(out))
    fresh = run_generate(greedy, str(teacher_dir), str(tiny_tokens.path), str(tmp_path / "fresh"))
    np.testing.assert_array_equal(store.blocks("train"), fresh.blocks("train"))


# --- the command line: refusals, and cache over the generated store -------------------------------------

def test_generate_refuses_a_teacher_of_another_tokenizer(kdcache, small_teacher, tiny_tokens, tmp_path):
    out = tmp_path / "gen"
    result = kdcache("generate", "--teacher", small_teacher, "--tokens", tiny_tokens.path, "--out", out)
    assert_refused(result, "tokenizer", "differs")
    assert_nothing_complete(out)


def test_cache_refuses_a_token_store_of_another_tokenizer(kdcache, small_teacher, tiny_tokens, tmp_path):
    out = tmp_path / "targets.zarr"
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", tiny_tokens.path, "--out", out, "--top-k", 4)
    assert_refused(result, "tokenizer", "differs")
    assert_nothing_complete(out)


def test_generate_refuses_max_new_tokens_past_the_positions(kdcache, small_teacher, small_tokens, tmp_path):
    out = tmp_path / "gen"
    result = kdcache("generate", "--teacher", small_teacher, "--tokens", small_tokens, "--out", out,
                     "--prompt-tokens", 8, "--max-new-tokens", 30)
    assert_refused(result, "--max-new-tokens 30", "32 positions", "24 or less")
    assert_nothing_complete(out)


def test_generate_refuses_zero_prompts(kdcache, small_teacher, small_tokens, tmp_path):
    result = kdcache("generate", "--teacher", small_teacher, "--tokens", small_tokens, "--out", tmp_path / "gen",
                     "--prompts", 0)
    assert_refused(result, "prompts must be >= 1")
    assert_nothing_complete(tmp_path / "gen")


def test_cache_and_student_over_the_generated_store(kdcache, small_teacher, small_tokens, tmp_path):
    gen = tmp_path / "gen"
    result = kdcache("generate", "--teacher", small_teacher, "--tokens", small_tokens, "--out", gen,
                     "--prompts", 16, "--prompt-tokens", 4, "--max-new-tokens", 12, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert "generated blocks" in result.output
    targets = tmp_path / "gen.zarr"
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", gen, "--out", targets, "--top-k", 4)
    assert result.exit_code == 0, result.output
    attrs = json.loads((targets / "zarr.json").read_text())["attributes"]
    assert attrs["complete"] and attrs["tokens_fingerprint"] == TokenStore(gen).fingerprint
    result = kdcache("student", "--tokens", gen, "--targets", targets, "--out", tmp_path / "student",
                     "--n-layer", 1, "--n-embd", 16, "--n-head", 2, "--batch-size", 4, "--max-steps", 2)
    assert result.exit_code == 0, result.output


# --- prepare --mix ----------------------------------------------------------------------------------------

def test_mix_takes_weighted_rows_of_each_store_shuffled(teacher_dir, tiny_tokens, tmp_path):
    gen = run_generate(CONFIG, str(teacher_dir), str(tiny_tokens.path), str(tmp_path / "gen"))
    config = PrepareConfig(mix=(str(tiny_tokens.path), f"{gen.path}:2"))
    mixed = mix_token_stores(config, tmp_path / "mixed")
    original, generated = tiny_tokens.blocks("train"), gen.blocks("train")
    rows = mixed.blocks("train")
    assert len(rows) == len(original) + 2 * len(generated)
    # Every row comes from a source, in the right multiplicity: compare as multisets of rows.
    expected = sorted(map(bytes, np.concatenate([original, generated, generated]).astype(np.int64)))
    assert sorted(map(bytes, rows.astype(np.int64))) == expected
    assert not np.array_equal(rows[:len(original)], original)  # shuffled
    np.testing.assert_array_equal(mixed.blocks("validation"), tiny_tokens.blocks("validation"))
    assert [s["weight"] for s in mixed.meta["settings"]["mix"]] == [1.0, 2.0]
    half = mix_token_stores(PrepareConfig(mix=(f"{tiny_tokens.path}:0.5",)), tmp_path / "half")
    assert len(half.blocks("train")) == round(0.5 * len(original))
    assert len({bytes(r) for r in half.blocks("train").astype(np.int64)}) == len(half.blocks("train"))


def test_mix_refuses_other_tokenizers_and_block_sizes(kdcache, small_tokens, tiny_tokens, tokens_block_64, tmp_path):
    out = tmp_path / "mixed"
    result = kdcache("prepare", "--out", out, "--mix", small_tokens, "--mix", tiny_tokens.path)
    assert_refused(result, "different tokenizers", str(tiny_tokens.path))
    assert_nothing_complete(out)
    result = kdcache("prepare", "--out", out, "--mix", small_tokens, "--mix", tokens_block_64)
    assert_refused(result, "different block sizes", "32", "64")
    assert_nothing_complete(out)
    result = kdcache("prepare", "--out", out, "--mix", f"{small_tokens}:0")
    assert_refused(result, "no rows")
    assert_nothing_complete(out)


def test_generate_help_shows_every_setting_and_chain_params_are_options(kdcache):
    import yaml

    from stages.cli import cli
    from tests.test_cli import option_names

    result = kdcache("generate", "--help")
    assert result.exit_code == 0
    for field in dataclasses.fields(GenerateConfig):
        assert f"--{field.name.replace('_', '-')}" in result.output
    root = Path(__file__).resolve().parents[1]
    for params_file in ("params.yaml", "params.smoke.yaml"):
        params = yaml.safe_load((root / "chain" / params_file).read_text())
        for stage, values in params.items():
            options = option_names(cli.commands[stage])
            for key in values:
                assert f"--{key}" in options, (params_file, stage, key)
