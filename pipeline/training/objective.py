"""The per-batch training objective: α·CE(hard labels) + (1−α)·τ²·KD + β·hidden + γ·attention (DESIGN §4),
plus, optionally, DistilBERT's cosine loss on the last hidden state (weight `cosine`).

Shapes: B batch, T block, N = B·T positions, V vocab, K top-k, D hidden width. Logits are cut to the
token store's V, so padded output layers are fine. α, τ and β may follow schedules over training
(pipeline/schedules.py); several targets stores (teachers) are mixed or summed (`multi_teacher`).
Which positions carry a hard label is the task's (pipeline/tasks.py). loss "uld" compares sorted
probabilities (no shared vocabulary); a cross-tokenizer batch's ALIGNED mask keeps the KD term to the
positions that have a teacher partner (its share is logged as `aligned`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from pipeline import losses
from pipeline.config import SCHEDULED
from pipeline.data.alignment import ALIGNED
from pipeline.models import DISTILLING_ATTENTION, DistilledBlocks, ValueStates
from pipeline.schedules import Schedule
from pipeline.targets import codecs
from pipeline.targets import format as fmt
from pipeline.tasks import CAUSAL


@dataclass
class Objective:
    """Computes the mixed loss for one batch. alpha = 1 and no targets: plain cross-entropy."""

    vocab_size: int
    alpha: float = 1.0
    temperature: float = 1.0
    capture_temperature: float = 1.0
    loss: str = "tail_kl"
    kd_signal: str = "topk"  # "sampled", "topk_sampled": the distilled term reads that kind of cached target
    tail_model: str = "atom"  # how the teacher's tail is tempered (losses.TAIL_MODELS)
    beta: float = 0.0
    layer_pairs: list[tuple[int, int]] = field(default_factory=list)  # (student layer, teacher layer)
    projections: torch.nn.ModuleDict | None = None  # str(student layer) -> Linear(D_s, D_t or P)
    # P / D_t for a rank-P store: the MSE over the P coefficients, scaled so, equals the full-width MSE
    # of μ + (projected)·Bᵀ against the teacher's h, up to a constant (the variance the basis leaves out).
    hidden_scale: float = 1.0
    hidden_loss: str = "mse"  # or "relative" (losses.HIDDEN_LOSSES)
    schedules: dict[str, Schedule] = field(default_factory=dict)  # alpha/temperature/beta over progress
    loss_chunk: int = 0  # positions per chunk of LM head + CE + KD; 0: all N at once
    teacher_weights: tuple[float, ...] = (1.0,)  # one per targets store, summing to 1
    multi_teacher: str = "mixture"  # or "sum" (see StudentConfig.multi_teacher)
    task: object = CAUSAL
    gamma: float = 0.0
    attention_loss: str = "minilm"  # or "tinybert" (losses.ATTENTION_LOSSES)
    attention_pairs: list[tuple[int, int]] = field(default_factory=list)  # (student block, teacher block), 1..L
    relation_heads: int = 0  # R of the store's value relations (minilm); 0: attention KL alone
    # Extra terms on the logits, e.g. the adversarial student's: term(logits (N, V), targets) → parts,
    # whose "weighted" entry is added to the loss and the rest logged. Not with loss_chunk.
    logit_terms: list = field(default_factory=list)
    cosine: float = 0.0  # weight of 1 − cos(student's last hidden state, teacher's cached last layer)
    cosine_pair: tuple[int, int] = (0, 0)  # (student layer, teacher layer); projections["cosine"] if widths differ

    def values_at(self, progress: float) -> dict[str, float]:
        """alpha, temperature, beta and gamma at this fraction of training (a schedule overrides the field)."""
        return {name: self.schedules[name].at(progress) if name in self.schedules else getattr(self, name)
                for name in SCHEDULED}

    def kd_keys(self) -> list[list[str]]:
        """Batch keys the KD term reads, one list per teacher (fmt.teacher_key)."""
        topk, sampled = [fmt.TOPK_IDS, fmt.TOPK_LOGPROBS, fmt.TAIL_LOGMASS], [fmt.SAMPLED_IDS, fmt.SAMPLED_COUNTS]
        names = {"topk": topk, "sampled": sampled, "topk_sampled": topk + sampled}[self.kd_signal]
        return [[fmt.teacher_key(name, i) for name in names] for i in range(len(self.teacher_weights))]

    def __call__(self, model, batch: dict, progress: float = 0.0) -> dict[str, torch.Tensor]:
        """progress: fraction of training done, in [0, 1] (for schedules)."""
        values = self.values_at(progress)
        alpha, temperature, beta = values["alpha"], values["temperature"], values["beta"]
        input_ids = batch["input_ids"]  # (B, T)
        labels, ce_mask = (x.flatten() for x in self.task.batch_labels(batch))
        # A scheduled alpha keeps KD on even at steps where it passes 1, so every logged row has it.
        with_kd = alpha < 1.0 or "alpha" in self.schedules
        targets = {key: batch[key].flatten(0, 1) for keys in self.kd_keys() for key in keys} if with_kd else {}
        if with_kd and ALIGNED in batch:
            targets[ALIGNED] = batch[ALIGNED].flatten()  # (N,)
        output_hidden = bool(self.layer_pairs and (beta or "beta" in self.schedules))  # likewise for beta
        output_hidden = output_hidden or self.cosine > 0
        gamma = values["gamma"]
        output_attention = bool(self.attention_pairs and (gamma or "gamma" in self.schedules))  # and gamma
        value_layers = [self.attention_pairs[-1][0]] if output_attention and self.uses_value_relations() else []
        blocks = DistilledBlocks(self.distilled_blocks(batch) if output_attention else {})
        # Eager attention (a student that takes no custom attention) returns every block's weights.
        eager = output_attention and getattr(model.config, "_attn_implementation", None) != DISTILLING_ATTENTION
        asked = {"output_attentions": True} if eager else {}  # as the plain model call had it
        with ValueStates(model, value_layers) as value_states, blocks:
            flat = None  # the (N, V) logits, for logit_terms
            if self.loss_chunk:
                out = model.base_model(input_ids=input_ids, output_hidden_states=output_hidden, use_cache=False,
                                       **asked)
                parts = self.chunked_logit_losses(model, out.last_hidden_state.flatten(0, 1), labels, ce_mask,
                                                  targets, temperature)
            else:
                out = model(**self.task.model_inputs(batch), output_hidden_states=output_hidden, **asked)
                flat = self.task.target_logits(out.logits[..., : self.vocab_size], batch).flatten(0, 1)  # (N, V)
                parts = self.logit_losses(flat, labels, ce_mask, targets, temperature)
        loss = alpha * parts["ce"]
        if "kd" in parts:
            loss = loss + (1 - alpha) * temperature**2 * parts["kd"]
        for term in self.logit_terms:
            extra = term(flat, targets)
            loss = loss + extra.pop("weighted")
            parts.update(extra)
        if self.cosine:
            s, t = self.cosine_pair
            student_hidden = out.hidden_states[s]  # (B, T, D_s)
            if self.projections is not None and "cosine" in self.projections:
                student_hidden = self.projections["cosine"](student_hidden)
            parts["cosine"] = losses.hidden_cosine(student_hidden.flatten(0, 1),
                                                   batch[fmt.hidden_array(t)].flatten(0, 1))
            loss = loss + self.cosine * parts["cosine"]
        if self.layer_pairs and (beta or "beta" in self.schedules):
            hidden, compare = [], losses.HIDDEN_LOSSES[self.hidden_loss]
            for s, t in self.layer_pairs:
                projected = self.projections[str(s)](out.hidden_states[s])  # (B, T, D_t)
                hidden.append(compare(projected.flatten(0, 1), batch[fmt.hidden_array(t)].flatten(0, 1)))
            # A rank-P store's relative MSE is taken on its coefficients, over the variance its basis
            # keeps: both sums are in the same space, so their P/D scale cancels.
            scale = self.hidden_scale if self.hidden_loss == "mse" else 1.0
            parts["hidden"] = scale * torch.stack(hidden).mean()
            loss = loss + beta * parts["hidden"]
        if output_attention:
            if eager:
                blocks.weights = {b: out.attentions[b - 1] for b in blocks.asked}
            parts["attention"] = self.attention_term(blocks, value_states, batch)
            loss = loss + gamma * parts["attention"]
        parts["loss"] = loss
        parts.update({name: torch.tensor(values[name]) for name in self.schedules})  # logged per step
        if ALIGNED in targets:
            parts["aligned"] = targets[ALIGNED].float().mean()
        return parts

    def uses_value_relations(self) -> bool:
        return self.attention_loss == "minilm" and self.relation_heads > 0

    def distilled_blocks(self, batch: dict) -> dict[int, tuple | None]:
        """DistilledBlocks' request: each student block the attention term reads, with (kind, teacher rows)
        where the term is that block's alone and the rows are sparse (its loss is then computed in the
        attention kernel), else None (its weights)."""
        pairs = self.attention_pairs if self.attention_loss == "tinybert" else self.attention_pairs[-1:]
        uses = [s for s, _ in pairs]
        asked = {}
        for s, t in pairs:
            rows = self.teacher_attention(batch, t)
            alone = uses.count(s) == 1 and isinstance(rows, losses.SparseRows)
            asked[s] = (self.attention_loss, rows) if alone else None
        return asked

    def attention_term(self, blocks: DistilledBlocks, value_states: dict, batch: dict) -> torch.Tensor:
        """tinybert: mean attention MSE over the block pairs; minilm: the last pair's attention KL
        (+ value-relation KL). Each block's loss from the kernel where it made one, else from its weights."""
        def block_loss(s, t, loss):
            return blocks.losses[s] if s in blocks.losses else loss(blocks.weights[s], self.teacher_attention(batch, t))

        if self.attention_loss == "tinybert":
            return torch.stack([block_loss(s, t, losses.attention_mse) for s, t in self.attention_pairs]).mean()
        s, t = self.attention_pairs[-1]
        loss = block_loss(s, t, losses.attention_kl)
        if self.uses_value_relations():
            loss = loss + losses.relation_kl(value_states[s], self.teacher_attention(batch, t, "value_relation"))
        return loss

    def teacher_attention(self, batch: dict, layer: int, kind: str = "attention"):
        """The teacher's rows of one stored matrix for this batch: decoded (B, H, T, T), or, from a topk
        store (format.decode_rows(..., sparse_attention=True)), losses.SparseRows (no T × T matrix)."""
        matrix = fmt.attention_array(layer, kind)
        if matrix in batch:
            return batch[matrix]
        return losses.SparseRows.of(*(batch[f"{matrix}_{role}"] for role in codecs.SPARSE_ROLES))

    def logit_losses(self, logits, labels, ce_mask, targets: dict, temperature: float) -> dict:
        """{"ce"} (no targets) or {"ce", "kd"}: masked means over the rows of logits (n, V)."""
        if not targets:
            return {"ce": losses.cross_entropy(logits, labels, ce_mask)}
        teachers = [[targets[key] for key in keys] for keys in self.kd_keys()]
        weights, tau, tau_c, tail = self.teacher_weights, temperature, self.capture_temperature, self.tail_model
        if len(teachers) == 1:  # fused CE + KD where one exists: one softmax, hand-written backward
            if self.kd_signal == "topk" and self.loss == "tail_kl":
                ce, kd = losses.ce_and_tail_kl(logits, labels, ce_mask, *teachers[0], tau, tau_c, tail_model=tail)
                return {"ce": ce, "kd": kd}
            if self.kd_signal in ("sampled", "topk_sampled"):
                fused = losses.ce_and_sampled_kd if self.kd_signal == "sampled" else losses.ce_and_topk_sampled_kd
                ce, kd = fused(logits, labels, ce_mask, *teachers[0], tau)
                return {"ce": ce, "kd": kd}
        ce = losses.cross_entropy(logits, labels, ce_mask)
        if self.loss == "uld":  # sorted probabilities at the capture temperature (make_objective checks τ)
            kd = sum(w * losses.uld_loss(logits / tau, logprobs, tail, targets.get(ALIGNED))
                     for w, (_, logprobs, tail) in zip(weights, teachers))
        elif self.kd_signal == "sampled":
            # Sampled KD is a cross-entropy, linear in the target: mixture and sum are the same loss.
            kd = sum(w * losses.sampled_kd(logits, ids, counts, tau) for w, (ids, counts) in zip(weights, teachers))
        elif self.kd_signal == "topk_sampled":  # at tau = tau_c; linear in the target up to a constant, as above
            kd = sum(w * losses.topk_sampled_kd(logits, *t, tau) for w, t in zip(weights, teachers))
        elif len(teachers) > 1 and self.multi_teacher == "mixture":
            kd = losses.mixture_kd(logits, teachers, weights, self.loss, tau, tau_c, tail_model=tail)
        else:
            kd = sum(w * losses.kd_loss(self.loss, logits, *t, tau, tau_c, tail_model=tail)
                     for w, t in zip(weights, teachers))
        return {"ce": ce, "kd": kd}

    def chunked_logit_losses(self, model, final_hidden, labels, ce_mask, targets: dict, temperature: float):
        """`logit_losses` from the final hidden states (N, D), loss_chunk positions at a time.

        Each chunk's head matmul and losses run under activation checkpointing, so backward recomputes
        that chunk's (chunk, V) logits instead of keeping all N rows: peak memory is one chunk's worth.
        Chunk means are weighted by their share of (masked) positions, so the sums equal the full means.
        """
        head = model.get_output_embeddings()
        n = final_hidden.shape[0]
        ce_count = ce_mask.sum().clamp(min=1).float()
        aligned = targets.get(ALIGNED)
        aligned_count = aligned.sum().clamp(min=1).float() if aligned is not None else None

        def chunk_losses(hidden, rows):
            logits = head(hidden)[:, : self.vocab_size]  # (chunk, V)
            parts = self.logit_losses(logits, labels[rows], ce_mask[rows],
                                      {k: v[rows] for k, v in targets.items()}, temperature)
            ce = parts["ce"] * (ce_mask[rows].sum() / ce_count)
            # KD losses average over every position (no mask), so a chunk weighs its share of N; over
            # the aligned ones only, with a cross-tokenizer mask.
            share = aligned[rows].sum() / aligned_count if aligned is not None else (rows.stop - rows.start) / n
            kd = parts["kd"] * share if "kd" in parts else torch.zeros_like(ce)
            return torch.stack([ce, kd])

        total = 0.0
        for start in range(0, n, self.loss_chunk):
            rows = slice(start, min(start + self.loss_chunk, n))
            total = total + checkpoint(chunk_losses, final_hidden[rows], rows, use_reentrant=False)
        return {"ce": total[0], "kd": total[1]} if targets else {"ce": total[0]}

