"""OS names for the agent's threads, so that ``top -H``, ``/proc/PID/task/*/comm`` and the
benchmarks' per-thread CPU show which stage uses the CPU (Python's thread names stay inside
Python). Linux only; elsewhere, or where ``prctl`` is missing, nothing happens."""

from __future__ import annotations

import contextlib
import ctypes
import sys

PR_SET_NAME = 15
MAX_LEN = 15  # the kernel keeps 15 bytes and the terminating NUL


def name_thread(name: str) -> None:
    """Name the calling thread for the OS (at most ``MAX_LEN`` bytes are kept)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:MAX_LEN], 0, 0, 0)
