"""GGUF teachers: `teacher --model X.gguf` (or a directory holding one) loads through transformers' GGUF
support, dequantised, and saves plain weights. The GGUF file is written here with the `gguf` package: a
1-layer llama of width 32 whose tokenizer is the small token store's BPE, with Q8_0 tensors."""

import json

import gguf
import numpy as np
import pytest
import torch

from tests.test_capture_scale import SETTINGS
from tests.test_cli import assert_refused

D, FF, EOS = 32, 64, "<|endoftext|>"


def write_gguf(path, tokenizer_json, architecture="llama"):
    """A tiny llama (1 layer, width 32) with the byte-level BPE of `tokenizer_json`; the embedding and
    feed-forward matrices quantised to Q8_0, the rest float32."""
    state = json.loads(tokenizer_json.read_text())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("kdcache-tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(D)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(D // 2)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token == EOS else 1 for token in tokens])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab[EOS])
    writer.add_eos_token_id(vocab[EOS])

    def tensor(name, *shape, quantised=False):
        data = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if quantised:
            writer.add_tensor(name, gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)

    tensor("token_embd.weight", len(tokens), D, quantised=True)
    tensor("output_norm.weight", D)
    tensor("output.weight", len(tokens), D)
    for name, shape in (("attn_norm", (D,)), ("ffn_norm", (D,)), ("attn_q", (D, D)), ("attn_k", (D, D)),
                        ("attn_v", (D, D)), ("attn_output", (D, D))):
        tensor(f"blk.0.{name}.weight", *shape)
    for name, shape in (("ffn_gate", (FF, D)), ("ffn_up", (FF, D)), ("ffn_down", (D, FF))):
        tensor(f"blk.0.{name}.weight", *shape, quantised=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_dir(small_tokens, tmp_path_factory):
    """A directory holding one GGUF file (and nothing else)."""
    root = tmp_path_factory.mktemp("gguf")
    write_gguf(root / "tiny-q8_0.gguf", small_tokens / "tokenizer" / "tokenizer.json")
    return root


def dequantised(path, name) -> np.ndarray:
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return gguf.dequantize(tensor.data, tensor.tensor_type)


def test_a_gguf_teacher_is_dequantised_saved_and_captured(kdcache, small_corpus, gguf_dir, tmp_path):
    file = gguf_dir / "tiny-q8_0.gguf"
    tokens, teacher, targets = tmp_path / "tokens", tmp_path / "teacher", tmp_path / "targets.zarr"
    result = kdcache("prepare", "--out", tokens, "--corpus", small_corpus, "--tokenizer", file,
                     "--block-size", 32, "--val-fraction", 0.3)  # the tokenizer read from the GGUF file
    assert result.exit_code == 0, result.output
    result = kdcache("teacher", "--tokens", tokens, "--out", teacher, "--model", gguf_dir)  # the directory
    assert result.exit_code == 0, result.output

    info = json.loads((teacher / "kdcache.json").read_text())
    assert info["source"] == str(gguf_dir)
    assert info["gguf"]["file"] == str(file.resolve()) and info["gguf"]["architecture"] == "llama"
    assert len(info["gguf"]["sha256"]) == 16 and info["gguf"]["saved_dtype"] == "float32"
    assert (teacher / "model.safetensors").exists() and not list(teacher.glob("*.gguf"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher)  # plain weights: no GGUF, no quantizer
    assert getattr(model.config, "quantization_config", None) is None
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(),
                                  dequantised(file, "token_embd.weight"))
    np.testing.assert_array_equal(model.model.layers[0].mlp.down_proj.weight.detach().numpy(),
                                  dequantised(file, "blk.0.ffn_down.weight"))

    result = kdcache("cache", "--teacher", teacher, "--tokens", tokens, "--out", targets, *SETTINGS)
    assert result.exit_code == 0, result.output
    assert kdcache("verify", targets).exit_code == 0

    result = kdcache("teacher", "--tokens", tokens, "--out", tmp_path / "half", "--model", file, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "half" / "kdcache.json").read_text())["gguf"]["saved_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "half").dtype == torch.bfloat16


def test_a_gguf_of_an_architecture_transformers_cannot_load_is_refused(kdcache, small_tokens, tmp_path):
    file = write_gguf(tmp_path / "odd.gguf", small_tokens / "tokenizer" / "tokenizer.json", architecture="kdcache-odd")
    result = kdcache("teacher", "--tokens", small_tokens, "--out", tmp_path / "teacher", "--model", file)
    assert_refused(result, f"cannot load the teacher --model {file}", "architecture kdcache-odd is not supported",
                   "reads gguf files of:", "llama", "save_pretrained")
    assert not (tmp_path / "teacher").exists()


def test_gguf_paths_that_name_no_single_file_are_refused(kdcache, small_tokens, gguf_dir, tmp_path):
    missing = tmp_path / "absent.gguf"
    result = kdcache("teacher", "--tokens", small_tokens, "--out", tmp_path / "t1", "--model", missing)
    assert_refused(result, f"{missing} does not exist")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes((gguf_dir / "tiny-q8_0.gguf").read_bytes())
    result = kdcache("teacher", "--tokens", small_tokens, "--out", tmp_path / "t2", "--model", two)
    assert_refused(result, f"{two} holds several GGUF files (a.gguf, b.gguf)")
