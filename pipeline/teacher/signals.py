"""What a teacher contributes per position: top-k log-probs + tail mass, samples, hidden states, attention.

`teacher_targets` is the single definition; the capture stores its output, and the online-KD and
mutual-learning baselines compute it inside the training loop. Shapes: B rows, T tokens per row,
P target positions per row (the task's), V vocabulary, K top-k, N samples, D hidden width.
"""

from __future__ import annotations

import torch

from pipeline.errors import KdcacheError
from pipeline.losses.attention import value_relation
from pipeline.models import ValueStates
from pipeline.targets import format as fmt
from pipeline.tasks import CAUSAL


def sample_targets(logprobs: torch.Tensor, num_samples: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `num_samples` ids per position from the teacher and store them as unique ids + counts.

    logprobs (B, T, V) float32 (normalised log-probs) → sampled_ids (B, T, N) int64 and
    sampled_counts (B, T, N) int64, N = num_samples. Draws are i.i.d. with replacement from
    p = exp(logprobs); each position's distinct ids come first in increasing id order, then padding
    (id 0, count 0), so the counts of a position sum to N. `generator` must live on logprobs' device.
    Vectorised: sort the draws, mark where each run of equal ids starts, scatter-add the run lengths.
    """
    if num_samples < 1:
        raise KdcacheError(f"num_samples must be at least 1, got {num_samples}.")
    *lead, vocab = logprobs.shape
    probs = logprobs.float().reshape(-1, vocab).exp()
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # (P, N)
    draws = draws.sort(dim=-1).values
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = starts.long().cumsum(dim=-1) - 1  # index of each draw's run among the distinct ids
    # Every draw of a run writes the same id to its slot, so duplicate indices are harmless here.
    ids = torch.zeros_like(draws).scatter_(-1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    shape = (*lead, num_samples)
    return ids.reshape(shape), counts.reshape(shape)


def trim_top_p(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, top_p: float, min_k: int = 1):
    """Keep per position the shortest prefix of the sorted top-k whose mass reaches top_p (≥ min_k).

    (..., K) ids and log-probs, most probable first → (ids, log-probs, count (...) int64); entries
    beyond the count become id 0 and log-prob −inf. top_p = 1 keeps all K.
    """
    top_k = topk_ids.shape[-1]
    count = torch.full(topk_ids.shape[:-1], top_k, dtype=torch.long, device=topk_ids.device)
    if top_p >= 1.0:
        return topk_ids, topk_logprobs, count
    below = topk_logprobs.exp().cumsum(dim=-1) < top_p  # prefixes still short of p
    count = (below.sum(dim=-1) + 1).clamp(min=min_k, max=top_k)
    absent = torch.arange(top_k, device=count.device) >= count.unsqueeze(-1)
    return topk_ids.masked_fill(absent, 0), topk_logprobs.masked_fill(absent, float("-inf")), count


@torch.inference_mode()
def teacher_targets(model, input_ids: torch.Tensor, vocab_size: int, top_k: int,
                    capture_temperature: float = 1.0, layers=(), num_samples: int = 0,
                    generator: torch.Generator | None = None, top_p: float = 1.0,
                    min_k: int = 1, task=CAUSAL, attention_mask: torch.Tensor | None = None,
                    rows: dict | None = None, attention_layers=(),
                    value_relation_heads: int = 0) -> dict[str, torch.Tensor]:
    """What the teacher contributes for a batch (B, T) of token ids.

    Returns topk_ids (B, P, K) int64 sorted by probability, topk_logprobs (B, P, K) float32 at
    `capture_temperature`, tail_logmass (B, P) float32 = log(1 − Σ top-k p) (−inf when nothing is
    left), and hidden_layer_{l} (B, T, D) for each requested layer. Padded vocabulary rows are cut off
    first. With num_samples > 0 it also returns sampled_ids and sampled_counts (B, P, N) int64:
    `sample_targets` drawn from the teacher at `capture_temperature` (random-sampling KD).
    With top_p < 1 it keeps per position the shortest prefix of the top-k whose mass reaches top_p
    (at least min_k entries) and also returns topk_count (B, P) int64: entries beyond it are id 0 and
    log-prob −inf, and tail_logmass is the mass of everything not kept.
    For classification, vocab_size is the number of labels C, P = 1 and attention_mask (B, T) is given.
    rows: the batch as TokenStore.rows gives it (ids and the task's columns), instead of input_ids and
    attention_mask; for masked LM P = M, the rows' mask_positions, returned as target_positions (B, M).
    With attention_layers (blocks 1..L; the model must be in eager attention, models.use_eager_attention)
    it also returns attention_layer_{l} (B, H, T, T) and, with value_relation_heads R > 0,
    value_relation_layer_{l} (B, R, T, T) (losses.value_relation of the block's values).
    """
    if rows is None:
        rows = {"input_ids": input_ids, **({} if attention_mask is None else {"attention_mask": attention_mask})}
    logits, result = teacher_forward(model, rows, vocab_size, task, layers, attention_layers, value_relation_heads)
    result.update(logit_targets(logits, rows, top_k, capture_temperature, num_samples, generator, top_p, min_k))
    return result


@torch.inference_mode()
def teacher_forward(model, rows: dict, vocab_size: int, task=CAUSAL, layers=(), attention_layers=(),
                    value_relation_heads: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The part of `teacher_targets` that runs the model: (logits (B, P, V) as the model gives them, the
    hidden, attention and value-relation arrays). The capture reduces the logits (`logit_targets`) on
    another thread while this runs on the next batch."""
    # output_attentions only when asked: a teacher (or a stand-in) need not take the argument otherwise.
    asked = {"output_attentions": True} if attention_layers else {}
    with ValueStates(model, attention_layers if value_relation_heads else ()) as values:
        out = model(**task.model_inputs(rows), output_hidden_states=bool(layers), **asked)
    logits = task.target_logits(out.logits[..., :vocab_size], rows)  # (B, P, V)
    result = {}
    for layer in layers:
        result[fmt.hidden_array(layer)] = out.hidden_states[layer].float()
    for layer in attention_layers:
        result[fmt.attention_array(layer)] = out.attentions[layer - 1].float()
        if value_relation_heads:
            relation = value_relation(values[layer], value_relation_heads)
            result[fmt.attention_array(layer, "value_relation")] = relation
    return logits, result


@torch.inference_mode()
def logit_targets(logits: torch.Tensor, rows: dict, top_k: int, capture_temperature: float = 1.0,
                  num_samples: int = 0, generator: torch.Generator | None = None, top_p: float = 1.0,
                  min_k: int = 1) -> dict[str, torch.Tensor]:
    """The part of `teacher_targets` that reduces the logits (B, P, V): top-k, tail, samples, positions."""
    vocab_size = logits.shape[-1]
    logits = logits.float()
    if capture_temperature != 1.0:  # x / 1 is exact: skip a pass over (B, P, V) at the usual τ = 1
        logits = logits / capture_temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    result = {}
    if top_k > 0:  # top_k = 0: sampled targets only
        topk_logprobs, topk_ids = logprobs.topk(top_k, dim=-1, sorted=True)
        topk_ids, topk_logprobs, count = trim_top_p(topk_ids, topk_logprobs, top_p, min_k)
        kept = torch.logsumexp(topk_logprobs, dim=-1).clamp(max=0.0)
        tail = torch.log(-torch.expm1(kept))  # log(1 - e^kept), accurate near 0
        # Nothing is left where every id is kept: don't keep rounding residue.
        tail = tail.masked_fill(count >= vocab_size, float("-inf"))
        result = {fmt.TOPK_IDS: topk_ids, fmt.TOPK_LOGPROBS: topk_logprobs, fmt.TAIL_LOGMASS: tail}
        if top_p < 1.0:
            result[fmt.TOPK_COUNT] = count
    if "mask_positions" in rows:
        result[fmt.TARGET_POSITIONS] = rows["mask_positions"]
    if num_samples > 0:
        result[fmt.SAMPLED_IDS], result[fmt.SAMPLED_COUNTS] = sample_targets(logprobs, num_samples, generator)
    return result
