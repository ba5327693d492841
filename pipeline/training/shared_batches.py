"""Batches made in a reader process and handed over in shared memory allocated once.

A reader thread shares the training process's interpreter: with attention targets (hundreds of KB a
row to read and decode) it cost a small student's step several ms in busy hours (BENCHMARKS §17,
eighth pass).
DataLoader worker processes read elsewhere too, but pickle every batch into fresh shared memory that
the training process maps and faults in anew each step. Here a forked process runs the same loader
(make_loader(stream, batch_size): same rows, same order, so resume plans are unchanged) and copies
each batch into one of a few slots that the training process allocated before forking it; only a
slot number crosses per batch.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import traceback

import torch

from pipeline.training.loader import BlockStream, make_loader

SLOTS = 4  # batches in flight: the one trained on, and up to three made ahead


class SharedBatches:
    """make_loader(stream, batch_size)'s batches, each made in a forked reader process.

    A batch's tensors are views of its slot: valid until the batch after it is asked for, when the slot
    goes back to the reader (the training loop is done with a batch by then). Copy what you keep longer.
    A reader starts with each iteration, from the stream's state then (its epoch, or the batches a
    resume skips), and is stopped when the iteration ends or is dropped.
    """

    def __init__(self, stream: BlockStream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size
        self.slots: list[dict[str, torch.Tensor]] | None = None  # made at the first iteration, then reused

    def __iter__(self):
        if self.slots is None:  # shared memory mapped here before any fork: every reader writes into it
            spec = self.stream.row_spec()
            self.slots = [{name: torch.empty((self.batch_size, *shape), dtype=dtype).share_memory_()
                           for name, (shape, dtype) in spec.items()} for _ in range(SLOTS)]
        context = multiprocessing.get_context("fork")  # the reader gets the stream as it is now
        free, ready = context.Queue(), context.Queue()
        for slot in range(SLOTS):
            free.put(slot)
        reader = context.Process(target=read_batches, daemon=True,
                                 args=(self.stream, self.batch_size, self.slots, free, ready, os.getpid()))
        reader.start()
        in_use = None
        try:
            while (message := receive(ready, reader)) is not None:
                slot, rows = message
                if in_use is not None:
                    free.put(in_use)  # its step is over: the loop asked for this batch
                in_use = slot
                yield {name: t[:rows] for name, t in self.slots[slot].items()}
        finally:
            reader.kill()
            reader.join()


def receive(ready, reader) -> tuple[int, int] | None:
    """The reader's next (slot, rows), or None at the end; its error raised here, or one if it died."""
    while True:
        try:
            message = ready.get(timeout=1)
        except queue.Empty:
            if not reader.is_alive():
                raise RuntimeError(f"the loader's reader process exited with code {reader.exitcode}") from None
            continue
        if isinstance(message, BaseException):
            raise message
        return message


def next_free(free, parent: int) -> int:
    """A slot the training process gave back. Ends this process once the training process is gone
    (killed, say, so that it could not stop the reader): an orphan would wait here for ever."""
    while True:
        try:
            return free.get(timeout=1)
        except queue.Empty:
            if os.getppid() != parent:
                raise SystemExit(0) from None


def read_batches(stream: BlockStream, batch_size: int, slots: list[dict[str, torch.Tensor]], free, ready,
                 parent: int) -> None:
    """The reader process: the loader's batches into the free slots, then None (or the error)."""
    torch.set_num_threads(1)  # decoding is light; the training process keeps the cores
    try:
        for batch in make_loader(stream, batch_size):
            slot, rows = next_free(free, parent), len(batch["row"])
            for name, t in batch.items():
                slots[slot][name][:rows].copy_(t)
            ready.put((slot, rows))
        ready.put(None)
    except Exception as error:  # raised again in the training process, with this process's traceback
        error.add_note(f"in the loader's reader process:\n{traceback.format_exc()}")
        try:
            pickle.dumps(error)
        except Exception:  # an error that cannot cross: its text can
            error = RuntimeError(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        ready.put(error)
    ready.close()
    ready.join_thread()  # the messages are out before the process ends
