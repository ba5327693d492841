"""The one module that knows what a task is: causal LM, masked LM and sequence classification.

A task says which `AutoModelFor...` class loads its models, which token-store columns a row carries
beside its ids, which hard label (if any) each target position has, and at how many positions per row
a teacher's targets are kept (the position axis of the targets store: T for causal LM, M masked
positions for masked LM, 1 for classification). Everything else — the store, the loader, the losses,
the loop — works on rows and positions and asks the task.

Shapes: B rows, T tokens per row (block_size), P target positions per row, M masked positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import KdcacheError


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction: position t's label is token t + 1; the last position has none."""

    name: str = "causal"
    auto_class: str = "AutoModelForCausalLM"
    columns: tuple = ()  # token-store columns a row carries beside input_ids

    def positions(self, meta: dict) -> int:
        """P from a store's meta (block_size, mask_count): every position of a row carries a teacher
        target here (the last one too: no label needed)."""
        return int(meta["block_size"])

    def labels(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids → labels (B, T) int64 and mask (B, T) bool, true where a position has a label."""
        labels = torch.roll(input_ids, -1, dims=1)
        mask = torch.ones_like(input_ids, dtype=torch.bool)
        mask[:, -1] = False
        return labels, mask

    def target_logits(self, logits: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        """(B, T, V) model logits → (B, P, V) at the target positions (all T for causal LM)."""
        return logits

    def batch_labels(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's hard labels (B, P) int64 and their mask (B, P) bool (from its input ids here)."""
        return self.labels(batch["input_ids"])

    def model_inputs(self, batch: dict) -> dict:
        """The keyword arguments of a forward pass over `batch`: the ids alone (blocks are full)."""
        return {"input_ids": batch["input_ids"]}


@dataclass(frozen=True)
class Classification:
    """Sequence classification: one example per row (padded, with an attention mask) and one label.

    The position axis has length 1: a row's target is its class distribution over C labels. The token
    store holds `attention_mask` (B, T) and `labels` (B,) beside the ids; the loader passes them on.
    """

    name: str = "classification"
    auto_class: str = "AutoModelForSequenceClassification"
    columns: tuple = ("attention_mask", "labels")

    def positions(self, meta: dict) -> int:
        return 1

    def batch_labels(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) labels → labels (B, 1) int64 and mask (B, 1) bool (every example has a label)."""
        labels = batch["labels"].long().unsqueeze(1)
        return labels, torch.ones_like(labels, dtype=torch.bool)

    def target_logits(self, logits: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        """(B, C) classifier logits → (B, 1, C): one target position per row."""
        return logits.unsqueeze(1) if logits.dim() == 2 else logits

    def model_inputs(self, batch: dict) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@dataclass(frozen=True)
class MaskedLM:
    """Masked LM (BERT, DistilBERT): masks are fixed at prepare time, so the teacher and every student
    see the same inputs. A row's input_ids hold the masked block; `mask_positions` (B, M) says where
    the M masked positions are (sorted) and `mask_labels` (B, M) the original ids there. Targets and
    hard labels exist at those M positions only; hidden states at every position.
    """

    name: str = "masked"
    auto_class: str = "AutoModelForMaskedLM"
    columns: tuple = ("mask_positions", "mask_labels")

    def positions(self, meta: dict) -> int:
        """P = M, the masked positions per row (`mask_count` of the token store and the targets store)."""
        return int(meta["mask_count"])

    def batch_labels(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The original ids at the masked positions (B, M) int64 and their mask (B, M) bool (all true)."""
        labels = batch["mask_labels"].long()
        return labels, torch.ones_like(labels, dtype=torch.bool)

    def target_logits(self, logits: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        """(B, T, V) logits → (B, M, V) at the batch's masked positions."""
        index = batch["mask_positions"].long().unsqueeze(-1).expand(-1, -1, logits.shape[-1])
        return logits.gather(1, index)

    def model_inputs(self, batch: dict) -> dict:
        return {"input_ids": batch["input_ids"]}  # packed blocks: no padding


TASKS = {task.name: task for task in (CausalLM(), MaskedLM(), Classification())}
CAUSAL = TASKS["causal"]
MASKED = TASKS["masked"]
CLASSIFICATION = TASKS["classification"]


def get_task(name: str):
    if name not in TASKS:
        raise KdcacheError(f"unknown task {name!r}; this kdcache knows {', '.join(TASKS)}.")
    return TASKS[name]
