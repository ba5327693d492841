"""Mixed precision for training: the autocast context and, for float16, the gradient scaler.

Weights and optimizer state stay float32 (the master copy); only the forward pass runs in the lower
dtype under `torch.autocast`. bfloat16 has float32's range, so it needs no scaling and runs on CPU and
GPU alike; float16 underflows small gradients unless the loss is scaled (GradScaler), which needs CUDA.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pipeline.errors import KdcacheError
from pipeline.runtime import torch_dtype


def check_dtype(name: str, device: torch.device) -> None:
    """Refuse, before training, a dtype the device cannot train in."""
    torch_dtype(name)
    if name == "float16" and device.type != "cuda":
        raise KdcacheError(f"--dtype float16 trains with a gradient scaler, which needs a CUDA device (this run "
                           f"is on {device}); use --dtype bfloat16 on CPU.")


def autocast(name: str, device: torch.device):
    """The forward pass's context: autocast to `name`, or nothing for float32."""
    if name == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch_dtype(name))


def grad_scaler(name: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 on CUDA; None otherwise (nothing to scale)."""
    return torch.amp.GradScaler(device.type) if name == "float16" else None
