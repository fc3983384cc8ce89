"""The file where ``backend = "auto"`` remembers its choice (under the agent's state dir).

``{"format": 2, "choices": {model_key: entry}}``; an entry records the runtime and the
precision served, the thread count and the runtimes installed when it was chosen, when,
and every candidate's figures. Format 1 (before precision was chosen) is not read: the
first start after an upgrade selects again. A file that cannot be read is rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from agent.log import get_logger

log = get_logger("agent.model.select")

CACHE_FORMAT = 2
CACHE_MAX_ENTRIES = 16


def read_cache(path: Path) -> dict[str, Any]:
    """The entries by model key ({} when the file is missing, unreadable or older)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("backend_cache_unreadable", path=str(path), error=str(exc),
                    fix="it is rebuilt; nothing to do")
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return {}
    entries = data.get("choices")
    return entries if isinstance(entries, dict) else {}


def write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Replace the file atomically with the newest ``CACHE_MAX_ENTRIES`` entries."""
    # The newest entries only: a device that cycles through many models keeps a small file.
    newest = sorted(entries.items(), key=lambda kv: str(kv[1].get("chosen_at", "")))
    kept = dict(newest[-CACHE_MAX_ENTRIES:])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, "choices": kept}, indent=2) + "\n",
                   encoding="utf-8")
    tmp.replace(path)


def remember(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add or replace one entry; a state dir that cannot be written is logged, not fatal."""
    entries = read_cache(path)
    entries[key] = entry
    try:
        write_cache(path, entries)
    except OSError as exc:
        log.warning("backend_cache_unwritable", path=str(path), error=str(exc),
                    fix="check that the agent's state dir is writable")


def forget(path: Path, key: str) -> None:
    """Drop one entry (a cached choice that no longer serves)."""
    entries = read_cache(path)
    if entries.pop(key, None) is not None:
        with contextlib.suppress(OSError):
            write_cache(path, entries)
