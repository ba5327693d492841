"""Model directories: build, load, save and describe any model kdcache trains or reads.

Every model is a plain Hugging Face `PreTrainedModel`, so `save_pretrained` / `AutoModelFor...
.from_pretrained` round-trip it with nothing of kdcache's needed. Beside the weights, kdcache keeps
one JSON file of its own (INFO_FILE): where the model came from, its fingerprint, its training.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextvars import ContextVar
from pathlib import Path

import torch

from pipeline import lstm  # noqa: F401  (registers the BiLSTM classifier with the Auto classes)
from pipeline import runtime
from pipeline.config import ModelShape
from pipeline.errors import KdcacheError
from pipeline.location import Location
from pipeline.tasks import CAUSAL

INFO_FILE = "kdcache.json"


def padded(vocab_size: int, multiple: int) -> int:
    return int(math.ceil(vocab_size / multiple) * multiple)


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_ids(tokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids of a tokenizer, as config.json and generation_config.json name them."""
    return {name: getattr(tokenizer, name, None) for name in SPECIAL_IDS}


def build_gpt2(shape: ModelShape, vocab_size: int, block_size: int, seed: int = 0,
               special: dict[str, int | None] | None = None):
    """A fresh GPT-2-style causal LM with the given shape; deterministic in `seed`.

    special: bos/eos/pad ids (`special_ids(tokenizer)`), written to config.json and
    generation_config.json so that `generate` stops at the tokenizer's end of text; None: unset.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    special = special or {}
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=shape.n_embd,
                        n_layer=shape.n_layer, n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, **{name: special.get(name) for name in SPECIAL_IDS})
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def _label_maps(label_names) -> dict:
    return {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}


def _bert_config(shape: ModelShape, vocab_size: int, block_size: int, pad_id: int | None, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=shape.n_embd, num_hidden_layers=shape.n_layer,
                      num_attention_heads=shape.n_head, intermediate_size=4 * shape.n_embd,
                      max_position_embeddings=block_size, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, pad_token_id=pad_id or 0, **extra)


def build_bert_classifier(shape: ModelShape, vocab_size: int, block_size: int, label_names, pad_id: int,
                          seed: int = 0):
    """A fresh BERT-style sequence classifier (C = len(label_names) labels); deterministic in `seed`."""
    from transformers import BertForSequenceClassification

    config = _bert_config(shape, vocab_size, block_size, pad_id, num_labels=len(label_names),
                          **_label_maps(label_names))
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def build_bert_mlm(shape: ModelShape, vocab_size: int, block_size: int, pad_id: int | None, seed: int = 0):
    """A fresh BERT-style masked LM (output layer tied to the input embeddings); deterministic in `seed`."""
    from transformers import BertForMaskedLM

    config = _bert_config(shape, vocab_size, block_size, pad_id)
    torch.manual_seed(seed)
    return BertForMaskedLM(config)


def build_lstm_classifier(shape: ModelShape, vocab_size: int, block_size: int, label_names, pad_id: int,
                          seed: int = 0):
    """A fresh BiLSTM classifier (pipeline/lstm.py): n_layer layers of width n_embd."""
    if shape.n_embd % 2:
        raise KdcacheError(f"--arch lstm splits n_embd over two directions: use an even n_embd, got {shape.n_embd}.")
    config = lstm.BiLSTMConfig(vocab_size=vocab_size, hidden_size=shape.n_embd, num_hidden_layers=shape.n_layer,
                               pad_token_id=pad_id, max_position_embeddings=block_size,
                               num_labels=len(label_names), **_label_maps(label_names))
    torch.manual_seed(seed)
    return lstm.BiLSTMForSequenceClassification(config)


def check_fits(model, tokens, what: str) -> None:
    """`check_model_fits` for the token store's task: for classification, the model's input vocabulary,
    positions and number of labels (its head must have one output per label of the store)."""
    if tokens.task_name != "classification":
        check_model_fits(model, tokens.vocab_size, tokens.block_size, what)
        return
    labels = int(getattr(model.config, "num_labels", 0))
    if labels != tokens.num_outputs:
        raise KdcacheError(f"the {what}'s classification head has {labels} labels but the token store has "
                           f"{tokens.num_outputs} ({', '.join(tokens.label_names)}); use a model fine-tuned on "
                           f"these labels, or let kdcache train the default teacher (teacher --model '').")
    rows = int(model.get_input_embeddings().weight.shape[0])
    if rows < tokens.vocab_size:
        raise KdcacheError(f"the {what}'s input embeddings have {rows} rows but the token store's tokenizer "
                           f"has {tokens.vocab_size} ids; prepare the tokens with this model's tokenizer.")
    limit = max_positions(model)
    if limit is not None and tokens.block_size > limit:
        raise KdcacheError(f"block_size {tokens.block_size} is beyond the {what}'s maximum of {limit} positions; "
                           f"re-run prepare with --block-size {limit} or less.")


def set_pad_id(model, pad_id: int, new_head: bool, what: str) -> None:
    """Give a classifier the token store's padding id. Decoder classifiers (Llama, GPT-2, ...) pool the
    last token that is not config.pad_token_id: unset, they refuse padded batches; another id, they pool
    a pad. A new head follows the store's padding; a trained head must have been trained with it."""
    current = model.config.pad_token_id
    if current is None or (new_head and current != pad_id):
        model.config.pad_token_id = pad_id
    elif current != pad_id:
        raise KdcacheError(f"the {what}'s config pads with id {current} but the token store's rows are padded "
                           f"with id {pad_id}; prepare the tokens with the tokenizer this classifier was trained "
                           f"with, or fine-tune it with a new head (teacher --finetune).")


# --- GGUF files (llama.cpp's format): read through transformers' GGUF loader, dequantised ------------

GGUF_INSTALL = "pip install 'kdcache[gguf]' (the gguf and accelerate packages)"


def gguf_file(name_or_path: str | Path) -> Path | None:
    """The GGUF file a --model names: a .gguf file, or the one .gguf in a directory without config.json;
    None when it names no GGUF."""
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise KdcacheError(f"{path} does not exist; give an existing .gguf file or a directory holding one.")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise KdcacheError(f"{path} holds several GGUF files ({', '.join(f.name for f in found)}); give one "
                           f"of them, e.g. {found[0]}.")
    return found[0] if found else None


def _from_gguf(path: Path, what: str, load, **options):
    """load(pretrained_model_name_or_path=..., gguf_file=..., **options) of the GGUF file `path`: refused
    early when a package is missing; a clear error naming the architecture when transformers cannot read it."""
    import importlib.util

    import transformers

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise KdcacheError(f"{path} is a GGUF file; loading it needs {' and '.join(missing)}: {GGUF_INSTALL}.")
    try:
        return load(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name, **options)
    except Exception as error:  # ValueError for an architecture it does not know, and whatever else
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "architecture" in reason and "not supported" in reason:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            reason += (f" transformers {transformers.__version__} reads GGUF files of: "
                       f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}. Convert the model to a Hugging "
                       f"Face directory (save_pretrained) and give that instead")
        raise KdcacheError(f"cannot load {what} {path}: {reason}.") from error


def load_gguf(path: Path, what: str = "model", task=CAUSAL):
    """The model of a GGUF file with plain float32 weights (quantised tensors dequantised), ready for
    save_pretrained."""
    import transformers

    options = {"dtype": torch.float32}
    try:  # transformers 5 keeps an unsaveable GGUF quantizer attached unless told to dequantize
        options["quantization_config"] = transformers.GgufConfig(dequantize=True)
    except AttributeError:  # older transformers always dequantize
        pass
    return _from_gguf(path, what, getattr(transformers, task.auto_class).from_pretrained, **options)


def load_tokenizer(name_or_path: str | Path, what: str = "tokenizer"):
    """AutoTokenizer of a directory, hub id, or GGUF file (or a directory holding one)."""
    from transformers import AutoTokenizer

    gguf = gguf_file(name_or_path)
    return _from_gguf(gguf, what, AutoTokenizer.from_pretrained) if gguf else AutoTokenizer.from_pretrained(name_or_path)


def load_model(name_or_path: str, what: str = "model", task=CAUSAL, new_head_labels=None):
    """`task.auto_class`.from_pretrained (or load_gguf) with an error that says what to do.

    new_head_labels: label names of a new classification head (fine-tuning an encoder whose head, if
    any, was trained for other labels); its weights start fresh."""
    import transformers

    auto_class = getattr(transformers, task.auto_class)
    if not name_or_path:
        raise KdcacheError(f"no {what} given.")
    gguf = gguf_file(name_or_path)
    if gguf:
        return load_gguf(gguf, what, task)
    local = Path(name_or_path)
    if local.exists() and not (local / "config.json").exists():
        raise KdcacheError(f"{what} {name_or_path!r} is a path without config.json; point at a directory "
                           f"written by save_pretrained.")
    # A hub id is NAME or ORG/NAME; anything else is a local path, so say it is missing instead of
    # letting the hub client complain about the form of a repo id.
    if not local.exists() and (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
                               or "\\" in name_or_path):
        raise KdcacheError(f"{what} {name_or_path!r} does not exist; point at a directory written by "
                           f"save_pretrained, or give a hub id (NAME or ORG/NAME).")
    head = {} if new_head_labels is None else {"num_labels": len(new_head_labels), "ignore_mismatched_sizes": True,
                                               **_label_maps(new_head_labels)}
    try:
        return auto_class.from_pretrained(name_or_path, **head)
    except Exception as e:  # OSError, ValueError, HTTP errors...: all mean "not loadable"
        raise KdcacheError(f"cannot load {what} {name_or_path!r} as an {task.auto_class}: "
                           f"{str(e).splitlines()[0]}") from e


def max_positions(model) -> int | None:
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def hidden_size(model) -> int:
    return int(model.config.hidden_size)


def output_vocab_size(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_model_fits(model, vocab_size: int, block_size: int, what: str) -> None:
    """Refuse a model that cannot score every token id or every position of the token store."""
    rows = output_vocab_size(model)
    if rows < vocab_size:
        raise KdcacheError(f"the {what}'s output layer has {rows} rows but the token store's tokenizer "
                           f"has {vocab_size} ids; prepare the tokens with this model's tokenizer "
                           f"(--tokenizer) or pick a model of that vocabulary.")
    limit = max_positions(model)
    if limit is not None and block_size > limit:
        raise KdcacheError(f"block_size {block_size} is beyond the {what}'s maximum of {limit} positions; "
                           f"re-run prepare with --block-size {limit} or less.")


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


TOKENIZER_ROOM = 4 * 2**20  # bytes allowed for the tokenizer and info files saved beside the weights


def check_room(models, out: str | Path, what: str = "the trained student") -> None:
    """Refuse, before training, an --out whose disk cannot take the weights of `models` (saved in their
    dtype) and a tokenizer each: a full disk would otherwise fail only after training."""
    weights = sum(p.numel() * p.element_size() for model in models for p in model.parameters())
    Location(out).check_free_space(weights + TOKENIZER_ROOM * len(models), what)


def save_model(model, tokens, out: str | Path, info: dict | None) -> None:
    """save_pretrained (safetensors) + the token store's tokenizer + INFO_FILE (unless info is None:
    the caller writes it after fingerprinting the weights), so from_pretrained(out) works.
    Under torchrun only rank 0 writes (every rank holds the same weights)."""
    if not runtime.is_main():
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    tokens.load_tokenizer().save_pretrained(out)
    if info is not None:
        write_info(out, info)


def write_info(model_dir: str | Path, info: dict) -> None:
    (Path(model_dir) / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))


def read_info(model_dir: str | Path, what: str = "model") -> dict:
    path = Path(model_dir) / INFO_FILE
    if not path.exists():
        raise KdcacheError(f"{model_dir} is not a {what} directory written by kdcache (no {INFO_FILE}); "
                           f"run `kdcache {what} --out {model_dir}` first.")
    return json.loads(path.read_text())


def hash_files(named_files) -> str:
    """sha256 (16 hex digits) over (name, path) pairs: each name, then the file's bytes, streamed."""
    h = hashlib.sha256()
    for name, path in named_files:
        h.update(name.encode())
        with Path(path).open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def fingerprint_model_dir(path: str | Path) -> str:
    """Hash of the config and every weight file: identifies the teacher a store was captured from."""
    return hash_files((f.name, f) for f in sorted(Path(path).iterdir())
                      if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".gguf"))


def model_fingerprint(spec: str) -> dict:
    """A teacher as params.yaml names it (`teacher.model`): a local directory is hashed (so DVC's `inputs`
    stage notices new weights); a hub id is remote and recorded as given; "" is the default teacher."""
    if not spec:
        return {"model": "", "note": "the default teacher, trained by the pipeline"}
    path = Path(spec)
    if path.is_dir():
        return {"model": spec, "sha256": fingerprint_model_dir(path)}
    if path.is_file():
        return {"model": spec, "sha256": hash_files([("", path)])}
    return {"model": spec, "remote": True}


# Files save_pretrained writes for a tokenizer (fast or slow); without them AutoTokenizer may build an
# empty one from config.json alone.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_same_tokenizer(model_dir: str, tokens, what: str = "the student",
                         fix: str = "the student must use the teacher's tokenizer") -> None:
    """A model brought from elsewhere (--init, teacher --model) must share the token store's
    vocabulary, id for id: the same size is not enough, every token must map to the same id."""
    local = Path(model_dir)
    if gguf_file(model_dir):
        theirs = load_tokenizer(model_dir, what).get_vocab()  # a GGUF file always holds its tokenizer
    elif local.is_dir() and not any((local / name).exists() for name in TOKENIZER_FILES):
        return  # no tokenizer saved beside the model: the size check is all we can do
    else:
        try:
            theirs = load_tokenizer(model_dir).get_vocab()
        except Exception:  # no tokenizer saved beside the model: the size check is all we can do
            return
    ours = tokens.load_tokenizer().get_vocab()
    if theirs != ours:
        differing = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda item: item[1])
        example = f"; e.g. {differing[0][0]!r} is id {theirs.get(differing[0][0])} in {model_dir}, " \
                  f"{ours.get(differing[0][0])} in the token store" if differing else ""
        raise KdcacheError(f"{what}'s vocabulary ({model_dir}, {len(theirs)} ids) differs from the token "
                           f"store's ({tokens.name}, {len(ours)} ids){example}; {fix}.")


def check_chunkable(model) -> None:
    """Refuse, before training, a model whose logits are not head(base model's last hidden state).

    Chunked losses (loss_chunk) apply `get_output_embeddings()` to `base_model(...).last_hidden_state`
    themselves; a model that scales or soft-caps its logits after the head would train on wrong logits.
    """
    name = type(model).__name__
    head = model.get_output_embeddings()
    if head is None or model.base_model is model:
        raise KdcacheError(f"loss_chunk needs a causal LM with a base model and an output-embedding head; "
                           f"{name} has none. Set loss_chunk 0.")
    length = min(8, max_positions(model) or 8)
    ids = torch.arange(length, device=next(model.parameters()).device).unsqueeze(0) % head.weight.shape[0]
    was_training = model.training
    model.eval()  # no dropout: the two paths must see the same activations
    try:
        with torch.no_grad():
            full = model(input_ids=ids).logits.float()
            rebuilt = head(model.base_model(input_ids=ids).last_hidden_state).float()
    finally:
        model.train(was_training)
    if full.shape != rebuilt.shape or not torch.allclose(full, rebuilt, rtol=1e-4, atol=1e-4):
        raise KdcacheError(f"loss_chunk assumes logits = output embeddings applied to the final hidden state, "
                           f"but {name} computes its logits otherwise (scaling or soft-capping, say). "
                           f"Set loss_chunk 0 for this model.")


# --- Attention weights and value states (attention distillation) ------------------------------------


def num_heads(model) -> int:
    return int(model.config.num_attention_heads)


def use_eager_attention(model, what: str) -> None:
    """Switch to the attention implementation that returns its weights (fused kernels return none);
    refuse, before any work, a model that cannot. Called only when attention is asked for."""
    name = type(model).__name__
    try:
        model.set_attn_implementation("eager")
    except Exception as e:  # ValueError / NotImplementedError: the architecture has no eager path
        raise KdcacheError(f"the {what} ({name}) cannot return attention weights: "
                           f"{str(e).splitlines()[0]}. Capture without --attention-layer.") from e
    length = min(4, max_positions(model) or 4)
    ids = torch.zeros(1, length, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    if not attentions or len(attentions) != num_layers(model) or attentions[0] is None:
        raise KdcacheError(f"the {what} ({name}) returns no attention weights even in eager mode; "
                           f"attention distillation needs a model that does.")


# The student's attention: the fused kernel (SDPA) in every block, except those a DistilledBlocks asks
# for. Eager attention would make and keep every block's T × T weights, and the loss would then pass
# over them again; here an asked block makes them once, and with SparseRows computes its loss inside
# (losses.DistilledAttention), so its weights never leave the kernel.
DISTILLING_ATTENTION = "kdcache_distilling"
_OPEN_BLOCKS: ContextVar = ContextVar("kdcache_distilled_blocks", default=None)


class DistilledBlocks:
    """Context manager: while open, a model in distilling attention (use_distilling_attention) keeps, for
    each asked block b (1..L), its attention weights in weights[b] (B, H, T, T), or, asked with
    (kind, SparseRows) ("tinybert" or "minilm", the teacher's rows with this block's head count), that
    block's attention loss in losses[b]. A block whose mask the kernel cannot take (padding, dropout)
    or whose head count differs from the rows' falls back to its weights."""

    def __init__(self, asked: dict[int, tuple | None]):
        self.asked, self.weights, self.losses = asked, {}, {}

    def __enter__(self) -> "DistilledBlocks":
        self.token = _OPEN_BLOCKS.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _OPEN_BLOCKS.reset(self.token)


def distilling_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: (B, H, T, d) query, key, value → ((B, T, H, d) output, None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    from pipeline.losses.attention import DistilledAttention, SparseRows

    blocks, layer = _OPEN_BLOCKS.get(), getattr(module, "layer_idx", None)
    if blocks is None or layer is None or layer + 1 not in blocks.asked:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    key, value = (repeat_kv(x, query.shape[1] // x.shape[1]) for x in (key, value))  # grouped-query heads
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    asked, causal = blocks.asked[layer + 1], getattr(module, "is_causal", True)
    if (isinstance(asked, tuple) and isinstance(asked[1], SparseRows) and attention_mask is None and causal
            and not (dropout and module.training) and asked[1].fill.shape[1] == query.shape[1]):
        kind, rows = asked
        output, blocks.losses[layer + 1] = DistilledAttention.apply(query, key, value, scale, kind, *rows,
                                                                    rows.mass())
    else:  # the weights, as eager attention makes them
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        if attention_mask is not None:
            mask = attention_mask[..., : key.shape[-2]]
            scores = scores.masked_fill(mask.logical_not(), float("-inf")) if mask.dtype == torch.bool \
                else scores + mask
        elif causal:
            T = scores.shape[-1]
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1),
                                        float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(value.dtype)
        blocks.weights[layer + 1] = weights
        output = torch.matmul(torch.nn.functional.dropout(weights, p=dropout, training=module.training), value)
    return output.transpose(1, 2).contiguous(), None


def use_distilling_attention(model, what: str) -> bool:
    """Put a student in distilling attention (True), or, where its architecture does not call
    transformers' attention interface per block, in eager attention (False; use_eager_attention's
    checks). Called only when attention is distilled."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DISTILLING_ATTENTION, distilling_attention)
    AttentionMaskInterface.register(DISTILLING_ATTENTION, sdpa_mask)  # padding masks as SDPA gets them
    blocks = DistilledBlocks(dict.fromkeys(range(1, num_layers(model) + 1)))
    try:
        model.set_attn_implementation(DISTILLING_ATTENTION)
        length = min(4, max_positions(model) or 4)
        ids = torch.zeros(1, length, dtype=torch.long, device=next(model.parameters()).device)
        with torch.no_grad(), blocks:
            model(input_ids=ids)
    except Exception:  # noqa: BLE001  (any failure: the architecture takes no custom attention)
        blocks.weights = {}
    if len(blocks.weights) == num_layers(model):
        return True
    use_eager_attention(model, what)
    return False


def value_projections(model) -> list[tuple[torch.nn.Module, slice | None]]:
    """Per block (1..L, listed from 0), the module whose output holds its attention values and the
    slice of its last axis that is them: GPT-2's fused c_attn (the last third), or a v_proj."""
    found = []
    for name, module in model.named_modules():
        if name.endswith(".v_proj"):
            found.append((module, None))
        elif name.endswith(".c_attn") and not name.endswith("crossattention.c_attn"):
            width = int(model.config.hidden_size)
            found.append((module, slice(2 * width, 3 * width)))
    if len(found) != num_layers(model):
        raise KdcacheError(f"cannot find the value projection of every block of {type(model).__name__} "
                           f"(found {len(found)} of {num_layers(model)}); value relations need a v_proj or a "
                           f"GPT-2 c_attn per block. Capture with --value-relation-heads 0.")
    return found


def value_width(model, block: int) -> int:
    """D_v, the width of block `block`'s (1..L) attention values."""
    module, part = value_projections(model)[block - 1]
    return (part.stop - part.start) if part is not None else int(module.out_features)


class ValueStates:
    """Context manager: while open, every forward pass records blocks' value states.

    with ValueStates(model, [3]) as values: model(...); values[3] is (B, T, D_v), keeping its graph.
    """

    def __init__(self, model, layers):
        self.model, self.layers, self.values, self.handles = model, sorted(set(layers)), {}, []

    def __enter__(self) -> dict[int, torch.Tensor]:
        projections = value_projections(self.model) if self.layers else []
        for layer in self.layers:
            module, part = projections[layer - 1]

            def keep(_module, _inputs, output, layer=layer, part=part):
                self.values[layer] = output if part is None else output[..., part]

            self.handles.append(module.register_forward_hook(keep))
        return self.values

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
