"""Jobs run in order on one background thread, behind a bounded queue: the capture's writer.

The capture's main thread runs the teacher's forward on batch i + 1 while this thread reduces, encodes,
compresses and writes batch i (torch ops, zstd/Blosc and file writes release the GIL). The queue holds
at most `depth` jobs, so memory stays bounded: a forward that outruns the writer waits for it.

A job that raises stops the thread: later jobs (a shard's write and record among them) never run, and
the error is raised again in the main thread at its next `submit` (within 0.1 s if it is waiting for
room in the queue) or at `close`.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

_STOP = object()


class BackgroundJobs:
    """submit(job) runs job() on the background thread (inline with threads=0); close() waits for all."""

    def __init__(self, depth: int = 2, threads: int = 1):
        if threads not in (0, 1):  # one thread: jobs run in submission order (records after their data)
            raise ValueError(f"threads must be 0 or 1, got {threads}")
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._work, name="capture-writer", daemon=True) if threads else None
        if self._thread is not None:
            self._thread.start()

    def _work(self) -> None:
        while (job := self._queue.get()) is not _STOP:
            try:
                job()
            except BaseException as failure:  # noqa: BLE001 - raised again in the main thread
                self.error = failure
                return  # later jobs never run; the main thread sees the error instead of room in the queue

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _put(self, item) -> None:
        while True:
            self._check()
            try:
                self._queue.put(item, timeout=0.1)  # wakes up to notice a failure while the queue is full
                return
            except queue.Full:
                pass

    def submit(self, job: Callable[[], None]) -> None:
        """Run job() after every job submitted before it; raise the error of a job that failed."""
        if self._thread is None:
            job()
        else:
            self._put(job)

    def close(self) -> None:
        """Wait for every submitted job; raise the error of one that failed."""
        if self._thread is not None:
            self._put(_STOP)
            self._thread.join()
        self._check()

    def __enter__(self) -> "BackgroundJobs":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
            return
        # The main thread failed: let the queued jobs finish (a shard already computed is still written)
        # and let the main thread's error through, not a job's.
        try:
            self.close()
        except BaseException:  # noqa: BLE001
            pass
