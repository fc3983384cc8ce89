"""What each check of ``iomt-agent doctor`` finds: one ``Finding`` per line of the checklist."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

Verdict = Literal["ok", "warn", "fail"]
EXPIRY_WARNING = timedelta(days=30)
MIN_FREE_BYTES = 256 * 1024 * 1024
GIB = 1024**3


@dataclass(frozen=True)


class Finding:
    verdict: Verdict
    check: str  # config | key | certificate | broker | model | fleet | disk
    subject: str  # what was checked: a key path, a broker, a file
    detail: str  # what was found
    fix: str = ""  # what to do about it (warn/fail)


def ok(check: str, subject: str, detail: str) -> Finding:
    return Finding("ok", check, subject, detail)


def warn(check: str, subject: str, detail: str, fix: str) -> Finding:
    return Finding("warn", check, subject, detail, fix)


def fail(check: str, subject: str, detail: str, fix: str) -> Finding:
    return Finding("fail", check, subject, detail, fix)


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def who() -> str:
    return "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"


def unreadable_fix(path: Path) -> str:
    return (f"run the doctor as root (sudo), or check the ownership of {path}; the service "
            "itself gets secrets through LoadCredential=")

def describe_mode(path: Path) -> str:
    st = path.stat()
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}"
