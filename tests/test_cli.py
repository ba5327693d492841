"""The `kdcache` command line: --help, params.yaml against the options, and clear refusals of bad input.

Every command runs in-process through click's CliRunner on a tiny real pipeline (conftest.py: a few KB
of text, a 1-layer teacher trained for 3 steps). A refusal must exit non-zero with an `Error: ...`
line naming the problem (no traceback) and must leave nothing behind that looks finished.
"""

import dataclasses
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
import zarr

from pipeline.targets import format as fmt
from pipeline.config import CacheConfig, EvaluateConfig, PrepareConfig, StudentConfig, TeacherConfig
from stages.cli import cli
from stages.options import build_config

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILES = ("params.yaml", "params.smoke.yaml", "params.classification.yaml",
                "params.classification.smoke.yaml")
CONFIGS = {"prepare": PrepareConfig, "teacher": TeacherConfig, "cache": CacheConfig,
           "student": StudentConfig, "evaluate": EvaluateConfig}
COMMANDS = ("inputs", "prepare", "teacher", "cache", "student", "evaluate", "inspect", "verify", "generate")
SMALL_STUDENT = ("--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--batch-size", "4")


def option_names(command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


def assert_refused(result, *words):
    """Non-zero exit, a clean `Error:` message (not a traceback) that contains every one of `words`."""
    assert result.exit_code != 0, f"expected a refusal, got exit 0:\n{result.output}"
    assert isinstance(result.exception, SystemExit), \
        f"uncaught {type(result.exception).__name__} instead of a clear message:\n{result.output}"
    assert "Traceback" not in result.output
    assert "Error:" in result.output, result.output
    message = result.output.lower()
    for word in words:
        assert word.lower() in message, f"{word!r} not in the message:\n{result.output}"


def assert_nothing_complete(out: Path):
    """Nothing at `out` (or, for a targets store, at least none marked complete)."""
    if (out / "zarr.json").exists():
        assert not zarr.open_group(out, mode="r").attrs.get("complete"), f"{out} is marked complete"
    assert not out.exists(), f"a refused run left {out} behind"
    assert not out.with_name(out.name + ".partial").exists()


def save_gpt2(path: Path, vocab_size: int, n_positions: int = 32):
    """A tiny randomly initialised GPT-2 written with save_pretrained (no hub access)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def save_word_tokenizer(path: Path, vocab_size: int):
    """A word-level tokenizer of `vocab_size` made-up words: not the teacher's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(path)


def vocab_size_of(tokens: Path) -> int:
    import json

    return json.loads((tokens / "meta.json").read_text())["vocab_size"]


# --- help and options ---------------------------------------------------------------------------


def test_group_help_lists_every_command(kdcache):
    result = kdcache("--help")
    assert result.exit_code == 0, result.output
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_help_of_every_command_shows_every_config_option(kdcache, name):
    result = kdcache(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    config = CONFIGS.get(name)
    for field in dataclasses.fields(config) if config else ():
        assert f"--{field.name.replace('_', '-')}" in result.output, f"{name} --help lacks {field.name}"
        assert f"--{field.name}" in result.output
        if field.metadata.get("help"):
            first_words = " ".join(field.metadata["help"].split()[:2])
            assert first_words in " ".join(result.output.split()), f"{name} --help lacks {field.name}'s help"


def test_params_yaml_holds_the_cli_defaults_except_the_overrides_the_readme_lists():
    """One place per default: params.yaml may differ from config.py only where the README says why."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The embedded default's settings")[1].split("\n## ")[0]
    listed = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and "." in cells[0]:
            listed[cells[0]] = cells[1]
    assert listed, "the README's override table is missing"
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    differ = {}
    for stage, values in params.items():
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(CONFIGS[stage])}
        for key, value in values.items():
            value = tuple(value) if isinstance(value, list) else value
            if value != defaults[key]:
                differ[f"{stage}.{key}"] = value
    assert set(differ) == set(listed), f"params.yaml overrides {sorted(differ)}; README lists {sorted(listed)}"
    assert all(str(differ[key]) == listed[key] for key in differ), (differ, listed)


@pytest.mark.parametrize("params_file", PARAMS_FILES)
def test_every_params_key_is_an_option_of_its_stage(params_file):
    params = yaml.safe_load((ROOT / params_file).read_text())
    assert set(params) == set(CONFIGS), f"{params_file} sections are not the stages"
    for section, values in params.items():
        command = cli.commands[section]
        names = option_names(command)
        params_by_name = {p.name: p for p in command.params}
        converted = {}
        for key, value in values.items():
            for option in (f"--{key}", f"--{key.replace('_', '-')}"):
                assert option in names, f"{params_file} {section}.{key}: `kdcache {section}` has no {option}"
            param = params_by_name[key]
            if isinstance(value, list):
                assert param.multiple, f"{section}.{key} is a list but {param.opts} is not repeatable"
                converted[key] = tuple(param.type.convert(v, param, None) for v in value)
            else:
                converted[key] = param.type.convert(value, param, None)
        build_config(CONFIGS[section], converted)  # the values themselves are valid


@pytest.mark.parametrize("params_file", PARAMS_FILES)
def test_dvc_stage_commands_parse_with_each_params_file(params_file):
    """Render dvc.yaml's cmds the way DVC does (.dvc/config `parsing`) and parse them with click."""
    from dvc.config import Config
    from dvc.parsing.interpolate import to_str

    parsing = dict(Config(dvc_dir=str(ROOT / ".dvc"))["parsing"])
    params = yaml.safe_load((ROOT / params_file).read_text())

    def lookup(match):
        value = params
        for part in match.group(1).split("."):
            value = value[part]
        return to_str(value, parsing)

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, spec in stages.items():
        argv = shlex.split(re.sub(r"\$\{([^}]+)\}", lookup, spec["cmd"]))
        assert argv[0] == "kdcache", spec["cmd"]
        command = cli.commands[argv[1]]
        context = command.make_context(argv[1], argv[2:])  # raises a UsageError on an unknown option
        if argv[1] in CONFIGS:
            build_config(CONFIGS[argv[1]], context.params)


# --- teacher --model ----------------------------------------------------------------------------


def test_teacher_model_dir_without_config_json(kdcache, small_tokens, tmp_path):
    model = tmp_path / "not_a_model"
    model.mkdir()
    (model / "weights.txt").write_text("nothing here")
    out = tmp_path / "teacher"
    result = kdcache("teacher", "--tokens", small_tokens, "--out", out, "--model", model)
    assert_refused(result, "config.json", str(model))
    assert_nothing_complete(out)


def test_teacher_model_path_that_does_not_exist(kdcache, small_tokens, tmp_path):
    model = tmp_path / "no" / "such" / "model"
    out = tmp_path / "teacher"
    result = kdcache("teacher", "--tokens", small_tokens, "--out", out, "--model", model)
    assert_refused(result, "does not exist", str(model))
    assert_nothing_complete(out)


# --- prepare ------------------------------------------------------------------------------------


def test_prepare_empty_corpus(kdcache, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("")
    out = tmp_path / "tokens"
    result = kdcache("prepare", "--out", out, "--corpus", corpus, "--vocab-size", 300, "--block-size", 32)
    assert_refused(result, "no training documents", "empty")
    assert_nothing_complete(out)


def test_prepare_glob_matching_nothing(kdcache, tmp_path):
    out = tmp_path / "tokens"
    result = kdcache("prepare", "--out", out, "--corpus", tmp_path / "nowhere" / "*.txt")
    assert_refused(result, "matches no files", "nowhere")
    assert_nothing_complete(out)


# --- cache --------------------------------------------------------------------------------------


def test_cache_top_k_larger_than_vocabulary(kdcache, small_tokens, small_teacher, tmp_path):
    vocab = vocab_size_of(small_tokens)
    out = tmp_path / "targets.zarr"
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", out,
                     "--top-k", vocab + 1)
    assert_refused(result, f"--top-k {vocab + 1}", "larger than the vocabulary", str(vocab))
    assert_nothing_complete(out)


def test_cache_layer_the_teacher_does_not_have(kdcache, small_tokens, small_teacher, tmp_path):
    out = tmp_path / "targets.zarr"
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", out,
                     "--top-k", 4, "--layer", 1, "--layer", 5)
    assert_refused(result, "--layer [5]", "does not exist", "0..1")
    assert_nothing_complete(out)


def test_cache_hidden_rank_refusals_then_a_low_rank_store(kdcache, small_tokens, small_teacher, tmp_path):
    out = tmp_path / "targets.zarr"
    common = ("cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", out, "--top-k", 4,
              "--rows-per-shard", 32, "--rows-per-chunk", 8)
    assert_refused(kdcache(*common, "--layer", 1, "--hidden-rank", 33), "--hidden-rank 33", "hidden size (32)")
    assert_refused(kdcache(*common, "--hidden-rank", 4), "hidden_rank needs", "--layer")
    assert_refused(kdcache(*common, "--layer", 1, "--hidden-rank", -1), "hidden_rank must be >= 0")
    assert_nothing_complete(out)
    result = kdcache(*common, "--layer", 1, "--hidden-rank", 4, "--hidden-fit-rows", 8)
    assert result.exit_code == 0, result.output
    result = kdcache("inspect", out)
    assert result.exit_code == 0, result.output
    assert "hidden states: rank 4 of 32" in result.output and "hidden_basis_layer_1" in result.output
    assert kdcache("verify", out).exit_code == 0


# --- block_size beyond the teacher's positions ---------------------------------------------------


@pytest.fixture(scope="session")
def tokens_block_64(kdcache, small_corpus, small_tokens, tmp_path_factory):
    """The same corpus and tokenizer as small_tokens, in blocks of 64: more than the teachers' 32."""
    out = tmp_path_factory.mktemp("block64") / "tokens"
    result = kdcache("prepare", "--out", out, "--corpus", small_corpus, "--tokenizer", small_tokens / "tokenizer",
                     "--block-size", 64, "--val-fraction", 0.3)
    assert result.exit_code == 0, result.output
    return out


def test_teacher_model_shorter_than_block_size(kdcache, small_tokens, tokens_block_64, tmp_path):
    model = save_gpt2(tmp_path / "short_model", vocab_size_of(small_tokens), n_positions=32)
    out = tmp_path / "teacher"
    result = kdcache("teacher", "--tokens", tokens_block_64, "--out", out, "--model", model)
    assert_refused(result, "block_size 64", "32 positions")
    assert_nothing_complete(out)


def test_cache_with_tokens_longer_than_the_teacher(kdcache, small_teacher, tokens_block_64, tmp_path):
    out = tmp_path / "targets.zarr"
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", tokens_block_64, "--out", out, "--top-k", 4)
    assert_refused(result, "block_size 64", "32 positions")
    assert_nothing_complete(out)


# --- student ------------------------------------------------------------------------------------


def test_student_targets_from_another_token_store(kdcache, small_corpus, small_tokens, small_targets, tmp_path):
    other = tmp_path / "other_tokens"  # same tokenizer and block size, one document fewer
    result = kdcache("prepare", "--out", other, "--corpus", small_corpus, "--tokenizer", small_tokens / "tokenizer",
                     "--block-size", 32, "--val-fraction", 0.3, "--max-documents", 23)
    assert result.exit_code == 0, result.output
    out = tmp_path / "student"
    result = kdcache("student", "--tokens", other, "--targets", small_targets, "--out", out,
                     "--max-steps", 1, *SMALL_STUDENT)
    assert_refused(result, "another token store", "fingerprint")
    assert_nothing_complete(out)


def test_student_maps_a_layer_that_was_not_captured(kdcache, small_tokens, small_targets, tmp_path):
    out = tmp_path / "student"
    result = kdcache("student", "--tokens", small_tokens, "--targets", small_targets, "--out", out,
                     "--beta", 1.0, "--layer-map", "1:1", "--max-steps", 1, *SMALL_STUDENT)
    assert_refused(result, "layers [1]", "not captured")
    assert_nothing_complete(out)


@pytest.mark.parametrize("extra_ids", [200, -200], ids=["larger", "smaller"])
def test_student_init_with_another_vocabulary(kdcache, small_tokens, small_targets, tmp_path, extra_ids):
    vocab = vocab_size_of(small_tokens)
    model = save_gpt2(tmp_path / "init_model", vocab + extra_ids)
    save_word_tokenizer(model, vocab + extra_ids)
    out = tmp_path / "student"
    result = kdcache("student", "--tokens", small_tokens, "--targets", small_targets, "--out", out,
                     "--init", model, "--max-steps", 1, "--batch-size", 4)
    assert_refused(result, "student", f"{vocab} ids", str(vocab + extra_ids))
    assert_nothing_complete(out)


def test_interrupted_capture_is_refused_then_resumed(kdcache, small_tokens, small_teacher, small_targets, tmp_path):
    """A capture stopped after its first shard: the state TargetsWriter leaves (shard 0 recorded, not complete)."""
    store = tmp_path / "targets.zarr"
    shutil.copytree(small_targets, store)
    group = zarr.open_group(store, mode="r+")
    shards = sorted(group[fmt.RECORDS].group_keys())
    assert len(shards) >= 3 and group.attrs["complete"] is True
    group.attrs["complete"] = False
    for name in shards[1:]:  # only shard 0's record was written
        del group[fmt.RECORDS][name]

    out = tmp_path / "student"
    result = kdcache("student", "--tokens", small_tokens, "--targets", store, "--out", out,
                     "--max-steps", 1, *SMALL_STUDENT)
    assert_refused(result, "unfinished", f"1/{len(shards)} shards", "kdcache cache")
    assert_nothing_complete(out)

    result = kdcache("inspect", store)
    assert result.exit_code == 0, result.output
    assert f"INCOMPLETE (1/{len(shards)} shards)" in result.output
    assert_refused(kdcache("verify", store), "bad shards")

    # Re-running the same capture resumes it (the identity matches) and completes it.
    result = kdcache("cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", store,
                     "--top-k", 8, "--batch-size", 64, "--rows-per-shard", 32, "--rows-per-chunk", 8)
    assert result.exit_code == 0, result.output
    assert f"resuming: 1 of {len(shards)} shards done" in result.output
    assert zarr.open_group(store, mode="r").attrs["complete"] is True
    result = kdcache("verify", store)
    assert result.exit_code == 0, result.output
    result = kdcache("student", "--tokens", small_tokens, "--targets", store, "--out", out,
                     "--max-steps", 1, *SMALL_STUDENT)
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists()


def test_inspect_tail_mass_histogram_as_json_text_and_svg(kdcache, small_targets, tmp_path):
    import json
    import xml.etree.ElementTree as ET

    import numpy as np

    result = kdcache("inspect", small_targets, "--json", "--plot", tmp_path / "tail.svg")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    for key in ("rows", "tokens", "bytes_per_token", "arrays", "encoding", "complete"):
        assert key in summary
    histogram = summary["tail_mass_histogram"]
    counts, edges = histogram["counts"], histogram["bin_edges"]
    assert len(edges) == len(counts) + 1 and edges[0] == 0.0 and edges[-1] == 1.0
    assert sum(counts) == summary["tokens"]
    # The counts are those of every stored position's tail mass, read straight from the store.
    tail_mass = np.exp(zarr.open_group(small_targets, mode="r")["tail_logmass"][:].astype(np.float64))
    assert counts == np.histogram(tail_mass, bins=np.array(edges))[0].tolist()

    root = ET.parse(tmp_path / "tail.svg").getroot()  # valid XML, or this raises
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect") if e.get("class") == "bar"]
    assert len(bars) == len(counts)
    assert [int(b.get("data-count")) for b in bars] == counts
    tallest = max(range(len(counts)), key=counts.__getitem__)
    assert float(bars[tallest].get("height")) == max(float(b.get("height")) for b in bars) > 0

    text = kdcache("inspect", small_targets)
    assert text.exit_code == 0, text.output
    lines = [line for line in text.output.splitlines() if line.strip().startswith("[")]
    assert len(lines) == len(counts)
    assert [int(line.split()[-1].replace(",", "")) for line in lines] == counts


def test_corrupt_shard_is_refused_by_the_student_and_repaired_by_cache(kdcache, small_tokens, small_teacher,
                                                                      small_targets, tmp_path):
    store = tmp_path / "targets.zarr"
    shutil.copytree(small_targets, store)
    # Flip bytes in the middle of shard 1's file of the log-probs: a disk error after the capture.
    shard_file = store / "topk_logprobs" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    shard_file.write_bytes(bytes(data))
    assert_refused(kdcache("verify", store), "bad shards 1 (rows 32-63)")

    out = tmp_path / "student"
    result = kdcache("student", "--tokens", small_tokens, "--targets", store, "--out", out,
                     "--max-steps", 1, *SMALL_STUDENT)
    assert_refused(result, "fails verification", "bad shards 1 (rows 32-63)", "re-run `kdcache cache`")
    assert_nothing_complete(out)
    # --no-verify skips the check (for huge stores): the corruption then goes unnoticed by design.
    result = kdcache("student", "--tokens", small_tokens, "--targets", store, "--out", out, "--no-verify",
                     "--max-steps", 1, *SMALL_STUDENT)
    assert "fails verification" not in result.output

    result = kdcache("cache", "--teacher", small_teacher, "--tokens", small_tokens, "--out", store,
                     "--top-k", 8, "--batch-size", 64, "--rows-per-shard", 32, "--rows-per-chunk", 8)
    assert result.exit_code == 0, result.output
    assert "shards [1]" in result.output and "re-capturing" in result.output
    assert kdcache("verify", store).exit_code == 0
    original = zarr.open_group(small_targets, mode="r")["topk_logprobs"][:]
    assert (zarr.open_group(store, mode="r")["topk_logprobs"][:] == original).all()
    result = kdcache("student", "--tokens", small_tokens, "--targets", store, "--out", tmp_path / "again",
                     "--max-steps", 1, *SMALL_STUDENT)
    assert result.exit_code == 0, result.output


def test_online_baseline_trains_with_the_teacher_in_the_loop(kdcache, small_tokens, small_teacher, tmp_path):
    out = tmp_path / "online"
    result = kdcache("student", "--tokens", small_tokens, "--online", "--teacher", small_teacher, "--out", out,
                     "--alpha", 0.5, "--max-steps", 2, *SMALL_STUDENT)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()
    refused = kdcache("student", "--tokens", small_tokens, "--online", "--out", tmp_path / "x", "--max-steps", 1)
    assert_refused(refused, "mode online needs --teacher")


# --- silent misconfigurations (a user's first week) ----------------------------------------------


def test_teacher_model_with_another_tokenizer_of_the_same_size(kdcache, small_tokens, tmp_path):
    """Same number of ids, other ids: the sizes match, so only comparing the vocabularies catches it."""
    vocab = vocab_size_of(small_tokens)
    model = save_gpt2(tmp_path / "hub_model", vocab)
    save_word_tokenizer(model, vocab)
    out = tmp_path / "teacher"
    result = kdcache("teacher", "--tokens", small_tokens, "--out", out, "--model", model)
    assert_refused(result, "teacher --model", "vocabulary", str(model), "prepare --tokenizer")
    assert_nothing_complete(out)


def test_teacher_model_with_the_token_stores_tokenizer_is_accepted(kdcache, small_tokens, tmp_path):
    from transformers import AutoTokenizer

    model = save_gpt2(tmp_path / "hub_model", vocab_size_of(small_tokens))
    AutoTokenizer.from_pretrained(small_tokens / "tokenizer").save_pretrained(model)
    result = kdcache("teacher", "--tokens", small_tokens, "--out", tmp_path / "teacher", "--model", model)
    assert result.exit_code == 0, result.output


def test_pipeline_models_take_special_ids_from_the_token_stores_tokenizer(kdcache, small_corpus, small_tokens,
                                                                         tmp_path):
    """A tokenizer whose end of text is not id 0: the teacher and student configs must say so."""
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_tokens / "tokenizer")
    tokenizer.add_special_tokens({"eos_token": "<|end|>"})  # appended: id 300, while bos/pad stay 0
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert tokenizer.eos_token_id == len(tokenizer) - 1 != tokenizer.bos_token_id
    tokens = tmp_path / "tokens"
    result = kdcache("prepare", "--out", tokens, "--corpus", small_corpus, "--tokenizer", tmp_path / "tokenizer",
                     "--block-size", 32, "--val-fraction", 0.3)
    assert result.exit_code == 0, result.output
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    result = kdcache("teacher", "--tokens", tokens, "--out", teacher, "--n-layer", 1, "--n-embd", 32, "--n-head", 2, "--max-steps", 1,
                     "--batch-size", 4)
    assert result.exit_code == 0, result.output
    result = kdcache("student", "--tokens", tokens, "--out", student, "--max-steps", 1, *SMALL_STUDENT)
    assert result.exit_code == 0, result.output
    for model_dir in (teacher, student):
        config = json.loads((model_dir / "config.json").read_text())
        generation = json.loads((model_dir / "generation_config.json").read_text())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            assert config[key] == getattr(tokenizer, key), (model_dir, key)
            assert generation[key] == getattr(tokenizer, key), (model_dir, key)


@pytest.mark.parametrize("what", ["tokens", "teacher"])
def test_inspect_names_what_a_directory_is(kdcache, small_tokens, small_teacher, what):
    path = {"tokens": small_tokens, "teacher": small_teacher}[what]
    result = kdcache("inspect", path)
    assert_refused(result, {"tokens": "is a token store", "teacher": "is a model directory"}[what],
                   "not a targets store")
    assert "cache --out" in result.output and f"cache --out {path}" not in result.output
