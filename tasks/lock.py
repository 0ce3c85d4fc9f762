"""One doit run at a time per configuration: a lock beside its doit state.

Two runs of one configuration at once would both find the same stages stale
and write the same outputs. The second run's graph waits for the first to
finish, saying so, and then finds those stages up to date. The lock is an
flock(2), so the kernel releases it when the holding process exits, killed
or not: no stale lock file ever blocks a build.
"""

from __future__ import annotations

import fcntl
import sys
from pathlib import Path

# Locks this process holds, open until it exits. Tests load the graph many
# times in one process; flock is per open file, so a second open would wait
# on this process's own lock forever.
_HELD: dict[Path, object] = {}


def hold(path: Path, what: str) -> None:
    """Take the lock at `path` for the rest of this process, waiting while
    another process holds it; `what` names the build in the message."""
    path = Path(path).resolve()
    if path in _HELD:
        return
    lock = open(path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another doit run holds the build of {what}; waiting for it to finish", file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    _HELD[path] = lock
