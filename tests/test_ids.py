"""Ids in the targets store: uint16 up to 65 536 ids, bit-packed above (round trips at the edges), and a
real capture + student steps over a vocabulary of 70 002 ids."""

import numpy as np
import pytest
import torch

from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig, PrepareConfig, StudentConfig, TeacherConfig
from pipeline.errors import KdcacheError
from pipeline.targets import ids as id_codec
from pipeline.targets import format as fmt
from pipeline.targets.format import decode_rows
from pipeline.teacher.load import load_teacher
from pipeline.training.teacher import materialise_teacher
from pipeline.teacher.signals import teacher_targets
from pipeline.data.tokens import EOS, TokenStore, prepare_tokens


@pytest.mark.parametrize("vocab, bits", [(300, None), (65_536, None), (65_537, 17), (131_072, 17),
                                         (152_064, 18)])
def test_layout_is_uint16_up_to_65536_ids_then_ceil_log2_bits(vocab, bits):
    layout = id_codec.ids_dtype(vocab)
    assert layout == ("uint16" if bits is None else f"packed{bits}") and id_codec.id_bits(layout) == bits


@pytest.mark.parametrize("vocab", [65_537, 131_072, 152_064])
@pytest.mark.parametrize("width", [1, 7, 32])
def test_packed_ids_round_trip_including_0_and_the_last_id(vocab, width):
    layout = id_codec.ids_dtype(vocab)
    bits = id_codec.id_bits(layout)
    ids = np.random.default_rng(vocab + width).integers(0, vocab, (3, 5, width))
    ids[0, 0, :] = vocab - 1          # every bit of the id set (for V = 2**17: all 17)
    ids[0, 1, :] = 0
    ids[1, 2, 0], ids[1, 2, -1] = vocab - 1, 0
    stored = id_codec.encode_ids(torch.from_numpy(ids), layout)
    row_shape, dtype = id_codec.ids_spec(layout, width)
    assert stored.dtype == np.uint8 == np.dtype(dtype) and stored.shape == (3, 5, *row_shape)
    assert stored.shape[-1] == -(-width * bits // 8)  # ceil(W·b/8) bytes: 18 bits → 72 bytes for 32 ids
    decoded = id_codec.decode_ids(stored, layout, width)
    assert decoded.dtype == torch.int64 and torch.equal(decoded, torch.from_numpy(ids))


def test_packing_is_the_documented_little_endian_bit_string():
    """Id w fills bits [w·b, (w+1)·b) of the position's bits, bit i = bit i % 8 of byte i // 8."""
    ids = np.array([[1, 0x1FFFF, 2]])  # b = 17
    packed = id_codec.pack_ids(ids, 17)
    bits = np.unpackbits(packed, axis=-1, bitorder="little")[0]
    expected = np.concatenate([[(i >> j) & 1 for j in range(17)] for i in ids[0]])
    np.testing.assert_array_equal(bits[:51], expected)
    assert not bits[51:].any() and packed.shape == (1, 7)


def test_packed_ids_need_the_store_attributes_and_huge_vocabularies_are_refused():
    stored = {fmt.TOPK_IDS: id_codec.encode_ids(np.zeros((1, 2, 4), np.int64), "packed17")}
    with pytest.raises(KdcacheError, match="decode_rows\\(stored, store.attrs\\)"):
        decode_rows(stored)
    assert decode_rows(stored, {"ids_dtype": "packed17", "top_k": 4})[fmt.TOPK_IDS].shape == (1, 2, 4)
    with pytest.raises(KdcacheError, match="needs 26 bits per id"):
        id_codec.ids_dtype(2**25 + 1)


# --- A real capture over 70 002 ids ------------------------------------------------------------------

BIG_VOCAB = 70_002


@pytest.fixture(scope="module")
def big_tokens(tmp_path_factory):
    """A token store whose tokenizer (a word-level one, words w0..w69999) has 70 002 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("big")
    vocab = {EOS: 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(BIG_VOCAB - 2)}}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=model, eos_token=EOS, unk_token="<unk>").save_pretrained(
        root / "tokenizer")
    rng = np.random.default_rng(0)
    (root / "corpus").mkdir()
    for d in range(10):  # words from the whole vocabulary: ids above 65 536 appear in the inputs too
        words = [f"w{i}" for i in rng.integers(0, BIG_VOCAB - 2, 120)] + ["w69999"]
        (root / "corpus" / f"doc{d}.txt").write_text(" ".join(words))
    config = PrepareConfig(corpus=str(root / "corpus"), tokenizer=str(root / "tokenizer"), block_size=16,
                           val_fraction=0.2)
    return prepare_tokens(config, root / "tokens")


@pytest.fixture(scope="module")
def big_teacher(big_tokens, tmp_path_factory):
    """A tiny GPT-2 (width 8) of that vocabulary, brought as a pretrained model (`teacher --model`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("big_teacher")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=BIG_VOCAB, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(root / "pretrained")
    materialise_teacher(TeacherConfig(model=str(root / "pretrained")), str(big_tokens.path), str(root / "teacher"))
    return root / "teacher"


def test_capture_and_student_over_a_vocabulary_above_65536(big_tokens, big_teacher, tmp_path):
    from pipeline.student import run_student

    assert big_tokens.vocab_size == BIG_VOCAB and int(big_tokens.blocks("train").max()) > 2**16
    config = CacheConfig(top_k=8, samples=4, batch_size=8, rows_per_chunk=4, rows_per_shard=8, encoding="fp32",
                         device="cpu")
    store = run_capture(config, str(big_teacher), str(big_tokens.path), str(tmp_path / "t.zarr"))
    assert store.attrs["ids_dtype"] == "packed17" and store.bad_shards() == []
    raw = store.read_rows(0, store.rows)
    assert raw[fmt.TOPK_IDS].dtype == np.uint8 and raw[fmt.TOPK_IDS].shape[-1] == 17  # 8 ids × 17 bits
    assert raw[fmt.SAMPLED_IDS].shape[-1] == 9                                        # 4 ids × 17 bits
    decoded = decode_rows(raw, store.attrs)
    model, _ = load_teacher(big_teacher)
    blocks = torch.from_numpy(TokenStore(big_tokens.path).blocks("train").astype(np.int64))
    direct = teacher_targets(model, blocks, BIG_VOCAB, 8, num_samples=4,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(decoded[fmt.TOPK_IDS], direct[fmt.TOPK_IDS])
    assert int(decoded[fmt.TOPK_IDS].max()) > 2**16  # the untrained teacher's favourites span the vocabulary
    torch.testing.assert_close(decoded[fmt.TOPK_LOGPROBS], direct[fmt.TOPK_LOGPROBS])
    sampled = decoded[fmt.SAMPLED_IDS]
    assert sampled.shape == direct[fmt.SAMPLED_IDS].shape and int(sampled.max()) < BIG_VOCAB
    assert torch.equal(sampled[decoded[fmt.SAMPLED_COUNTS] == 0], torch.zeros_like(sampled[decoded[fmt.SAMPLED_COUNTS] == 0]))

    # tau 2 with the one-atom tail (the defaults this test was written under): KD clearly above 0 even for
    # an untrained teacher and student, both near uniform.
    student = StudentConfig(n_layer=1, n_embd=8, n_head=2, max_steps=2, batch_size=2, alpha=0.5, device="cpu",
                            temperature=2.0, tail_model="atom")
    last = run_student(student, str(big_tokens.path), str(tmp_path / "student"), str(store.path))
    assert np.isfinite(last["kd"]) and last["kd"] > 0
