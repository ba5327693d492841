"""Where code runs: the torch device and dtype, and under torchrun the process group, rank and world size.

`torchrun --nproc-per-node N -- $(which kdcache) student ...` sets WORLD_SIZE, RANK and LOCAL_RANK;
the student and teacher stages call `start()` first. Outside torchrun every function here
answers as for a single process (rank 0 of 1), so library code calls them unconditionally.
See docs/DDP.md.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import time

import torch
import torch.distributed as dist


def keep_freed_memory() -> int:
    """Have glibc's malloc keep large freed blocks for reuse instead of handing them back to the OS.

    By default glibc maps each block over a threshold (128 KiB, rising to at most 32 MiB) afresh and
    unmaps it on free, so the large CPU tensors every step makes (logits, T × T attention, decoded
    shards) fault their pages in again each time: about a third of the default student's CE step on
    these CPUs (BENCHMARKS §17). Blocks up to 64 MiB (32 MiB where an older glibc caps it) now come
    from the heap, and the heap's free top is never trimmed: a step frees several such blocks at once,
    and any trim threshold they outgrow hands them all back to be faulted in again by the next step
    (at twice the block size, 2 of 4 runs of tests/test_allocator.py did). A training process's
    peak recurs every step, so holding it costs nothing it would not take again.
    Returns that block size, or 0 off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): its allocator is left as it is
        return 0
    mmap_threshold, trim_threshold, never = -3, -1, -1  # mallopt's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    for size in (64 << 20, 32 << 20):
        if libc.mallopt(mmap_threshold, size):
            return size if libc.mallopt(trim_threshold, never) else 0
    return 0


def decode_in_one_thread() -> None:
    """Have zarr decompress chunks in one thread, in this process from now on.

    zarr hands each chunk's decompression to a pool of threads (asyncio's default: cores + 4). A
    student's loader already reads one shard ahead beside the step (its reader process or thread,
    which inherits this setting), and a pool beside that takes the cores the step runs on: on these
    2-core machines a step ran about twice as slow while shards were read (BENCHMARKS §17). Loader
    workers (num_workers) read in parallel where cores are many.
    """
    import zarr

    zarr.config.set({"threading.max_workers": 1})


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 alone writes logs, checkpoints and the model."""
    return rank() == 0


def launched_world_size() -> int:
    """Processes torchrun started (WORLD_SIZE), known before the process group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device: str = "auto") -> None:
    """Join the process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); the group
    is destroyed when the process exits. Without torchrun, or called again, it does nothing."""
    if launched_world_size() <= 1 or active():
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


def from_main(value):
    """Rank 0's `value` on every rank (a picklable object); itself when single-process."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(while_waiting=None, every: float = 2.0) -> None:
    """Wait for every rank (nothing when single-process). while_waiting: called every `every` seconds
    until the others arrive, and once after (e.g. to show their progress)."""
    if not active():
        return
    if while_waiting is None:
        dist.barrier()
        return
    work = dist.barrier(async_op=True)
    while not work.is_completed():
        while_waiting()
        time.sleep(every)
    work.wait()
    while_waiting()


def check_device(name: str) -> None:
    """Refuse a --device torch does not know ("gpu") or this machine does not have (cuda without CUDA),
    naming what to give instead. Configs call it when they are built, before any work."""
    from pipeline.errors import KdcacheError

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        hint = " (an NVIDIA GPU is `cuda`)" if name.split(":")[0].lower() == "gpu" else ""
        raise KdcacheError(f"unknown --device {name!r}{hint}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA GPU is visible to this process")
            raise KdcacheError(f"--device {name}: CUDA is not available ({why}); use --device cpu or auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KdcacheError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                               f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise KdcacheError(f"--device {name}: MPS is not available on this machine; use --device cpu or auto.")


def resolve_device(name: str) -> torch.device:
    """auto → cuda when available, else cpu; under torchrun "cuda" means this rank's GPU."""
    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and active():
        return torch.device("cuda", torch.cuda.current_device())  # set by start() from LOCAL_RANK
    return torch.device(name)


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype name (config.DTYPES)."""
    from pipeline.errors import KdcacheError

    if name not in TORCH_DTYPES:
        raise KdcacheError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {name!r}.")
    return TORCH_DTYPES[name]
