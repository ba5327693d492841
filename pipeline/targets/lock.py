"""One writer at a time: a lock object inside the targets store naming its holder.

`kdcache.lock` holds {host, pid, started}. A second capture finding it is refused with the holder's
name; a lock whose holder is gone (same host, process no longer running) is stale and taken over with
a message; `--force` takes over any lock (the other writer, if alive, must be stopped first). The lock
is removed when the capture ends, also on an error; a kill -9 leaves it, and the next run finds it stale.
Under torchrun rank 0 holds it for every rank.
"""

from __future__ import annotations

import os
import socket
import time

from pipeline.errors import KdcacheError
from pipeline.location import Location

LOCK_NAME = "kdcache.lock"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}"


def is_stale(holder: dict) -> bool:
    """Its holder is known to be gone: a process of this host that no longer runs. A holder on
    another host cannot be checked from here and is never stale (use --force)."""
    return holder.get("host") == socket.gethostname() and not _running(int(holder.get("pid", -1)))


class WriterLock:
    def __init__(self, location: Location, force: bool = False):
        self.location, self.force = location, force
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def acquire(self) -> None:
        for _ in range(3):  # a stale lock removed by someone else in between: try again
            if self.location.create_json(LOCK_NAME, self.mine):
                return
            holder = self.location.read_json(LOCK_NAME)
            if holder is None:  # torn write or just released
                self.location.delete(LOCK_NAME)
                continue
            if self.force:
                print(f"[cache] --force: taking over the lock of {self.location} from {describe(holder)}")
            elif is_stale(holder):
                print(f"[cache] taking over the stale lock of {self.location}: its holder ({describe(holder)}) "
                      f"is no longer running")
            else:
                raise KdcacheError(
                    f"{self.location} is being written by another capture ({describe(holder)}). Wait for it "
                    f"to finish, or, if that process is gone (e.g. on another host), re-run with --force.")
            self.location.delete(LOCK_NAME)
        raise KdcacheError(f"could not take the lock of {self.location} ({LOCK_NAME}); try again.")

    def held(self) -> bool:
        """Still ours (not taken over by a --force run)."""
        return self.location.read_json(LOCK_NAME) == self.mine

    def check(self) -> None:
        """Refuse to go on writing once another capture took the lock over (--force)."""
        if not self.held():
            raise KdcacheError(f"the lock of {self.location} was taken over by another capture (--force); "
                               f"this one stops without marking the store complete.")

    def release(self) -> None:
        if self.held():
            self.location.delete(LOCK_NAME)
