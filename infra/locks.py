"""One process at a time per unit of work, when several share a state dir.

Two batch runs, a retry beside a run, or two workers on one machine may reach the same run
fingerprint together. Each unit of work (a prune, an evaluation, a publication) takes an exclusive
`flock` on `<state dir>/locks/<name>.lock` first; the other process waits, then finds the finished
result and reuses it. The kernel drops the lock of a process that dies, so a crashed holder's lock
is taken over at once, with no stale-lock guessing. The file records the holder for messages.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with that id exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def exclusive(folder: Path, name: str) -> Iterator[None]:
    """Hold the lock `name` under `folder` for the block; waits (logging who holds it) while taken."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.lock"
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "another process"
            log.warning("waiting for %s: %s holds it", name, holder)
            started = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.warning("took %s after %.0f s", name, time.monotonic() - started)
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(handle)  # releases the lock
