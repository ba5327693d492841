"""The teacher writes data: prompts from the train split, continued by sampling; a new token store.

Sequence-level KD (Kim & Rush, 2016) trains a student on what the teacher writes rather than on (or
besides) the corpus. `run_generate` draws `prompts` windows of `prompt_tokens` tokens from the source's
train split (seeded), continues each by `max_new_tokens` tokens with a batched KV-cache decoding loop,
and packs the sequences (EOS-separated, as `prepare` packs documents) into a token store with the
source's tokenizer and block size. Its validation split is the source's, so students trained on it
are scored on the original held-out text.

Each prompt samples from its own generator (seeded by its index), so its tokens do not depend on which
batch it falls in. A batch is the unit of resume: finished batches sit in OUT.partial-generate/ as .npy
files beside the settings they were made with, and a re-run with the same settings skips them.

Shapes: B prompts in a batch, P prompt tokens, M new tokens, V the tokenizer's vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline import runtime
from pipeline.config import GenerateConfig
from pipeline.data.corpus import pack_blocks
from pipeline.data.tokens import TokenStore, write_token_store
from pipeline.errors import KdcacheError
from pipeline.models import check_model_fits, max_positions
from pipeline.progress import progress
from pipeline.teacher.load import check_teacher_tokenizer, load_teacher


def draw_prompts(blocks: np.ndarray, count: int, prompt_tokens: int, seed: int) -> np.ndarray:
    """(count, P) int64: windows of P tokens at seeded random rows and offsets of `blocks` (N, T)."""
    rng = np.random.default_rng([seed, 0])
    rows = rng.integers(0, len(blocks), size=count)
    offsets = rng.integers(0, blocks.shape[1] - prompt_tokens + 1, size=count)
    return np.stack([blocks[r, o:o + prompt_tokens] for r, o in zip(rows, offsets)]).astype(np.int64)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generators: list) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids: argmax at temperature 0, else one draw per row from its generator.

    The draw is an inverse-CDF lookup of one uniform per row, so row b's id depends only on its logits
    and generators[b], not on the other rows of the batch.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # (B, V)
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    if top_p < 1.0:
        # Keep an id while the mass before it is still short of top_p: the smallest prefix reaching it.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    cdf = sorted_probs.cumsum(dim=-1)  # (B, V), unnormalised after top-p
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(cdf.device)  # (B,)
    picks = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)
    return sorted_ids.gather(-1, picks).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate_batch(model, prompt_ids: torch.Tensor, max_new_tokens: int, vocab_size: int, temperature: float,
                   top_p: float, generators: list, kv_cache: bool = True) -> torch.Tensor:
    """(B, P) prompts -> (B, P + M) prompts with their continuations.

    With kv_cache each step feeds only the newest token and the past keys/values; without, the whole
    sequence so far (the slow reference). Only the tokenizer's ids are drawn: a padded output layer's
    extra rows are cut off.
    """
    ids = prompt_ids
    step_input, past = prompt_ids, None
    for _ in range(max_new_tokens):
        if kv_cache:
            out = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            out = model(input_ids=ids, use_cache=False)
        logits = out.logits[:, -1, :vocab_size].float()  # (B, V)
        next_ids = sample_next(logits, temperature, top_p, generators).unsqueeze(-1)  # (B, 1)
        ids = torch.cat([ids, next_ids], dim=1)
        step_input = next_ids
    return ids


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The sampling generator of prompt `index`: the same whatever batch the prompt falls in."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def generation_identity(config: GenerateConfig, tokens: TokenStore, teacher_dir: str, teacher_info: dict) -> dict:
    """What the generated rows depend on: the settings, the teacher and the source (its provenance)."""
    return {"settings": asdict(config), "teacher": str(teacher_dir),
            "teacher_fingerprint": teacher_info["fingerprint"], "source": tokens.name,
            "source_fingerprint": tokens.fingerprint}


def check_generate(config: GenerateConfig, tokens: TokenStore, model) -> None:
    """Refuse, before the teacher runs, settings the teacher or the token store cannot serve."""
    if config.prompt_tokens > tokens.block_size:
        raise KdcacheError(f"--prompt-tokens {config.prompt_tokens} is longer than a block of the token store "
                           f"({tokens.block_size} tokens); choose at most {tokens.block_size}.")
    limit = max_positions(model)
    if limit is not None and config.prompt_tokens + config.max_new_tokens > limit:
        raise KdcacheError(f"--max-new-tokens {config.max_new_tokens} after {config.prompt_tokens} prompt tokens "
                           f"goes past the teacher's {limit} positions; choose --max-new-tokens "
                           f"{max(limit - config.prompt_tokens, 0)} or less (or fewer --prompt-tokens).")
    packed = config.prompts * (config.prompt_tokens + config.max_new_tokens + 1)  # + 1: the EOS after each
    if packed < tokens.block_size:
        raise KdcacheError(f"{config.prompts} prompts of {config.prompt_tokens} + {config.max_new_tokens} tokens "
                           f"do not fill one block of {tokens.block_size}; raise --prompts or --max-new-tokens.")


def _work_dir(out: Path, identity: dict) -> Path:
    """OUT.partial-generate/, holding the batches of a run with these exact settings (else emptied)."""
    work = out.with_name(out.name + ".partial-generate")
    record = work / "identity.json"
    if work.exists() and (not record.exists() or json.loads(record.read_text()) != identity):
        print(f"[generate] {work} holds batches made with other settings; starting over")
        shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True)
        record.write_text(json.dumps(identity, indent=2, sort_keys=True))
    return work


def _save_batch(path: Path, sequences: np.ndarray) -> None:
    """Write-then-rename: a batch file that exists is whole."""
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, sequences)
    os.replace(tmp, path)


def run_generate(config: GenerateConfig, teacher_dir: str, tokens_dir: str, out: str,
                 stop_after_batches: int | None = None) -> TokenStore | None:
    """Generate `config.prompts` sequences with the teacher and write them as a token store at `out`.

    Resumable: batches finished by an earlier run with the same settings are not generated again.
    stop_after_batches: return (None) after generating this many batches, leaving the work directory
    as a killed run would (for tests of the resume).
    """
    out = Path(out)
    tokens = TokenStore(tokens_dir)
    if tokens.task_name != "causal":  # prompts are cut from packed text blocks; a classifier writes no text
        raise KdcacheError(f"generate continues text with a causal LM; {tokens.path} holds {tokens.task_name} "
                           f"rows. Use a causal LM token store and teacher.")
    model, info = load_teacher(teacher_dir)
    check_model_fits(model, tokens.vocab_size, tokens.block_size, "teacher")
    check_teacher_tokenizer(teacher_dir, tokens)
    check_generate(config, tokens, model)
    identity = generation_identity(config, tokens, teacher_dir, info)
    prompts = draw_prompts(tokens.blocks("train"), config.prompts, config.prompt_tokens, config.seed)  # (N, P)
    work = _work_dir(out, identity)
    starts = range(0, config.prompts, config.batch_size)
    todo = [lo for lo in starts if not (work / f"batch-{lo:09d}.npy").exists()]
    if len(todo) < len(starts):
        print(f"[generate] resuming: {len(starts) - len(todo)} of {len(starts)} batches done")

    device = runtime.resolve_device(config.device)
    model.to(device).eval()
    new_tokens = sum(min(config.batch_size, config.prompts - lo) for lo in todo) * config.max_new_tokens
    bar = progress(total=new_tokens, desc="generate", unit="tok", unit_scale=True)
    start_time = time.perf_counter()
    for done, lo in enumerate(todo):
        if stop_after_batches is not None and done == stop_after_batches:
            bar.close()
            return None
        hi = min(lo + config.batch_size, config.prompts)
        generators = [prompt_generator(config.seed, index) for index in range(lo, hi)]
        sequences = generate_batch(model, torch.from_numpy(prompts[lo:hi]).to(device), config.max_new_tokens,
                                   tokens.vocab_size, config.temperature, config.top_p, generators,
                                   config.kv_cache)  # (B, P + M)
        _save_batch(work / f"batch-{lo:09d}.npy", sequences.cpu().numpy().astype(np.int32))
        bar.update((hi - lo) * config.max_new_tokens)
        bar.set_postfix(tok_s=f"{bar.n / (time.perf_counter() - start_time):,.0f}", refresh=False)
    bar.close()

    sequences = np.concatenate([np.load(work / f"batch-{lo:09d}.npy") for lo in starts])  # (N, P + M)
    train = pack_blocks((row.tolist() for row in sequences), tokens.block_size, tokens.meta.get("eos_id"))
    store = write_token_store(out, tokens, {"train": train, "validation": tokens.blocks("validation")},
                              identity["settings"], generated={k: v for k, v in identity.items() if k != "settings"})
    shutil.rmtree(work)
    return store
