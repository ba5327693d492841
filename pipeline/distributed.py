"""Data-parallel training under torchrun: the process group, this process's rank, rank-0-only work.

`torchrun --nproc-per-node N -- $(which kdcache) student ...` sets WORLD_SIZE, RANK and LOCAL_RANK;
the student and teacher stages call `start()` first. Outside torchrun every function here
answers as for a single process (rank 0 of 1), so library code calls them unconditionally.
See docs/DDP.md.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 alone writes logs, checkpoints and the model."""
    return rank() == 0


def start(device: str = "auto") -> None:
    """Join the process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); the group
    is destroyed when the process exits. Without torchrun, or called again, it does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per local rank
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(dist.destroy_process_group)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself when single-process)."""
    if not active():
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size()
