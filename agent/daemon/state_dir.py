"""The state directory (``agent.state_dir``): checked before anything is put in it.

It holds the store (scans are PHI), the cached runtime choice and the fleet's trusted
metadata, so it must be a directory this user can write; ``run`` creates it (0700) when it
is missing and refuses with ``StateDirError`` when it cannot be used. ``config check`` asks
``state_dir_problem``, which changes nothing.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from agent.errors import AgentError


class StateDirError(AgentError):
    """``agent.state_dir`` is not a directory this user can create or write."""


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def state_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as the state directory, or None; changes nothing."""
    fix = (f"give agent.state_dir a directory that user {_user()} can write (the service "
           "unit's StateDirectory= makes one)")
    if path.exists():
        if not path.is_dir():
            return f"agent.state_dir {path} is a file, not a directory: {fix}"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"agent.state_dir {path} is not writable by user {_user()}: {fix}"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"agent.state_dir {path}: {parent} is a file, not a directory: {fix}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return (f"agent.state_dir {path} does not exist and user {_user()} cannot create it "
                f"in {parent}: {fix}")
    return None


def prepare_state_dir(path: Path) -> None:
    """Create ``path`` (0700) if it is missing; ``StateDirError`` when it cannot be used."""
    problem = state_dir_problem(path)
    if problem is None:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a read-only filesystem: os.access does not know
            problem = f"agent.state_dir {path}: cannot create it: {exc.strerror}"
    if problem is not None:
        raise StateDirError(problem)


class StateLock:
    """One agent per state directory: an exclusive ``flock`` on ``agent.lock`` in it, held
    until ``release`` (or the process ends: the kernel drops it, also after kill -9)."""

    def __init__(self, path: Path) -> None:
        import fcntl

        self.file = (path / "agent.lock").open("a+", encoding="ascii")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise StateDirError(
                f"agent.state_dir {path}: another agent (pid {holder}) is using it: stop that "
                "one first (`systemctl stop iomt-agent`); a second agent on this machine "
                "needs its own config, client ids and state_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing the file drops the lock
