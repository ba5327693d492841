"""The one module that knows what a task is: causal LM and sequence classification (masked LM next).

A task says which `AutoModelFor...` class loads its models, which hard label (if any) each position
of a row has, and at how many positions per row a teacher's targets are kept (the position axis of
the targets store: T for language modelling, M masked positions for masked LM, 1 for
classification). Everything else — the store, the loader, the losses, the loop — works on rows and
positions and asks the task.

Shapes: B rows, T tokens per row (block_size), P target positions per row.
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

    def positions(self, block_size: int) -> int:
        """P: every position of a row carries a teacher target (the last one too: no label needed)."""
        return block_size

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

    def positions(self, block_size: int) -> int:
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


TASKS = {task.name: task for task in (CausalLM(), Classification())}
CAUSAL = TASKS["causal"]
CLASSIFICATION = TASKS["classification"]


def get_task(name: str):
    if name not in TASKS:
        raise KdcacheError(f"unknown task {name!r}; this kdcache knows {', '.join(TASKS)}.")
    return TASKS[name]
