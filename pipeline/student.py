"""Build causal LMs: config-scaled GPT-2 students (also the default teacher's architecture).

Every model here is a plain Hugging Face `PreTrainedModel`, so `save_pretrained` /
`AutoModelForCausalLM.from_pretrained` round-trip it with nothing of kdcache's needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.config import ModelShape
from pipeline.errors import KdcacheError


def padded(vocab_size: int, multiple: int) -> int:
    return int(math.ceil(vocab_size / multiple) * multiple)


def build_gpt2(shape: ModelShape, vocab_size: int, block_size: int, seed: int = 0):
    """A fresh GPT-2-style causal LM with the given shape; deterministic in `seed`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=shape.n_embd,
                        n_layer=shape.n_layer, n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def load_causal_lm(name_or_path: str, what: str = "model"):
    """AutoModelForCausalLM.from_pretrained with an error that says what to do."""
    from transformers import AutoModelForCausalLM

    if not name_or_path:
        raise KdcacheError(f"no {what} given.")
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
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path)
    except Exception as e:  # OSError, ValueError, HTTP errors...: all mean "not loadable"
        raise KdcacheError(f"cannot load {what} {name_or_path!r} as an AutoModelForCausalLM: "
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
