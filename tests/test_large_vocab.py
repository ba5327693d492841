"""A vocabulary past 2**17 end to end (Gemma 3 has 262 144 ids; Megatron-LM's offline store stops at
2**17): prepare with the teacher's tokenizer, teacher --model, cache, verify, student. The tokenizer is a
word-level one built here with 262 144 entries, the corpus's words at ids above 2**17, and the teacher a
GPT-2 of width 8 built from a config."""

import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.data.tokens import TokenStore
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore

VOCAB = 262_144
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def large_vocab_teacher(small_corpus, tmp_path_factory):
    """A model directory (GPT-2, 1 layer, width 8, VOCAB ids) with its word-level tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = sorted({w for f in small_corpus.iterdir() for w in re.findall(r"\w+|[^\w\s]", f.read_text())})
    vocab = {f"<unused{i}>": i for i in range(VOCAB)}
    for offset, word in enumerate(words):  # the corpus's words spread over ids 131 072 ... 262 143
        del vocab[f"<unused{2**17 + offset * 37 % 2**17}>"]
        vocab[word] = 2**17 + offset * 37 % 2**17
    del vocab["<unused0>"], vocab["<unused1>"]
    vocab[EOS], vocab["<unk>"] = 0, 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, unk_token="<unk>")
    assert len(tokenizer) == VOCAB
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=8, n_layer=1, n_head=2))
    out = tmp_path_factory.mktemp("large_vocab") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_vocabulary_past_2_17_captures_verifies_and_trains(kdcache, small_corpus, large_vocab_teacher, tmp_path):
    tokens, teacher, targets = tmp_path / "tokens", tmp_path / "teacher", tmp_path / "targets.zarr"
    result = kdcache("prepare", "--out", tokens, "--corpus", small_corpus, "--tokenizer", large_vocab_teacher,
                     "--block-size", 32, "--val-fraction", 0.3)
    assert result.exit_code == 0, result.output
    assert f"vocabulary {VOCAB}" in result.output
    result = kdcache("teacher", "--tokens", tokens, "--out", teacher, "--model", large_vocab_teacher)
    assert result.exit_code == 0, result.output
    result = kdcache("cache", "--teacher", teacher, "--tokens", tokens, "--out", targets, "--top-k", 16,
                     "--samples", 8, "--batch-size", 4, "--rows-per-shard", 8, "--rows-per-chunk", 4)
    assert result.exit_code == 0, result.output
    assert kdcache("verify", targets).exit_code == 0

    store = TargetsStore(targets)
    assert store.vocab_size == VOCAB and store.attrs["ids_dtype"] == "packed18"
    decoded = store.decode(store.read_rows(0, store.rows))
    ids = decoded[fmt.TOPK_IDS]
    assert ids.max() >= 2**17 and ids.min() >= 0 and ids.max() < VOCAB
    # The stored ids and log-probs are the teacher's own top-k, recomputed here from its logits.
    rows = torch.from_numpy(TokenStore(tokens).blocks("train")[:4].astype(np.int64))
    with torch.no_grad():
        logprobs = torch.log_softmax(AutoModelForCausalLM.from_pretrained(teacher)(rows).logits.float(), -1)
    top = logprobs.topk(16, dim=-1)
    assert torch.equal(ids[:4], top.indices)
    torch.testing.assert_close(decoded[fmt.TOPK_LOGPROBS][:4].float(), top.values, atol=2e-2, rtol=0)
    sampled = decoded[fmt.SAMPLED_IDS][decoded[fmt.SAMPLED_COUNTS] > 0]
    assert sampled.max() >= 2**17 and sampled.max() < VOCAB

    result = kdcache("student", "--tokens", tokens, "--targets", targets, "--out", tmp_path / "student",
                     "--n-layer", 1, "--n-embd", 8, "--n-head", 2, "--batch-size", 2, "--max-steps", 2)
    assert result.exit_code == 0, result.output
    result = kdcache("student", "--tokens", tokens, "--targets", targets, "--out", tmp_path / "student_sampled",
                     "--kd-signal", "sampled", "--n-layer", 1, "--n-embd", 8, "--n-head", 2, "--batch-size", 2,
                     "--max-steps", 2)
    assert result.exit_code == 0, result.output
