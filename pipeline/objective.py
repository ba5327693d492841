"""The per-batch training objective: α·CE(hard labels) + (1−α)·τ²·KD + β·hidden loss (DESIGN §4).

Shapes: B batch, T block, V vocab, K top-k, D hidden width. Logits are cut to the token store's V,
so padded output layers are fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline import losses
from pipeline.targets import format as fmt


@dataclass
class Objective:
    """Computes the mixed loss for one batch. alpha = 1 and no targets: plain cross-entropy."""

    vocab_size: int
    alpha: float = 1.0
    temperature: float = 1.0
    capture_temperature: float = 1.0
    loss: str = "tail_kl"
    kd_targets: str = "topk"  # or "sampled": the distilled term reads that kind of cached target
    beta: float = 0.0
    layer_pairs: list[tuple[int, int]] = field(default_factory=list)  # (student layer, teacher layer)
    projections: torch.nn.ModuleDict | None = None  # str(student layer) -> Linear(D_s, D_t or P)
    # P / D_t for a rank-P store: the MSE over the P coefficients, scaled so, equals the full-width MSE
    # of μ + (projected)·Bᵀ against the teacher's h, up to a constant (the variance the basis leaves out).
    hidden_scale: float = 1.0

    def __call__(self, model, batch: dict, progress: float = 0.0) -> dict[str, torch.Tensor]:
        """progress: fraction of training done, in [0, 1] (for schedules)."""
        input_ids = batch["input_ids"]  # (B, T)
        out = model(input_ids=input_ids, output_hidden_states=bool(self.beta and self.layer_pairs))
        logits = out.logits[..., : self.vocab_size]  # (B, T, V)
        V = self.vocab_size
        flat = logits.reshape(-1, V)  # (B*T, V)
        # Position t predicts token t+1: the last position of a block has no hard label.
        labels = torch.roll(input_ids, -1, dims=1).flatten()
        ce_mask = torch.ones_like(input_ids, dtype=torch.bool)
        ce_mask[:, -1] = False
        ce_mask = ce_mask.flatten()
        parts = {}
        if self.alpha >= 1.0:
            parts["ce"] = losses.cross_entropy(flat, labels, ce_mask)
        elif self.kd_targets == "sampled":
            parts["ce"] = losses.cross_entropy(flat, labels, ce_mask)
            parts["kd"] = losses.sampled_kd(flat, batch[fmt.SAMPLED_IDS].flatten(0, 1),
                                            batch[fmt.SAMPLED_COUNTS].flatten(0, 1), self.temperature)
        else:
            ids = batch[fmt.TOPK_IDS].flatten(0, 1)  # (B*T, K)
            logprobs = batch[fmt.TOPK_LOGPROBS].flatten(0, 1)
            if self.loss == "tail_kl":
                parts["ce"], parts["kd"] = losses.ce_and_tail_kl(
                    flat, labels, ce_mask, ids, logprobs, batch[fmt.TAIL_LOGMASS].flatten(),
                    self.temperature, self.capture_temperature)
            else:
                parts["ce"] = losses.cross_entropy(flat, labels, ce_mask)
                parts["kd"] = losses.KD_LOSS_FUNCTIONS[self.loss](
                    flat, ids, logprobs, batch[fmt.TAIL_LOGMASS].flatten(), self.temperature,
                    self.capture_temperature)
        loss = self.alpha * parts["ce"]
        if "kd" in parts:
            loss = loss + (1 - self.alpha) * self.temperature**2 * parts["kd"]
        if self.beta and self.layer_pairs:
            hidden = []
            for s, t in self.layer_pairs:
                projected = self.projections[str(s)](out.hidden_states[s])  # (B, T, D_t)
                hidden.append(losses.hidden_mse(projected.flatten(0, 1), batch[fmt.hidden_array(t)].flatten(0, 1)))
            parts["hidden"] = self.hidden_scale * torch.stack(hidden).mean()
            loss = loss + self.beta * parts["hidden"]
        parts["loss"] = loss
        return parts


