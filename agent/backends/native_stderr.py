"""Keep the runtimes' native output off the JSON log stream.

LiteRT prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` and onnxruntime
its warnings straight to file descriptor 2 from C++, where the agent writes one JSON object
per line; one such line breaks ``journalctl -u iomt-agent -o cat | jq .``. While a runtime
loads a model (``agent.backends.open_runner``) and the log is JSON lines, fd 2 is a pipe:
a relay thread turns each native line into a ``runtime_output`` event (level from the
line's own prefix: ``INFO`` info, ``ERROR``/``E`` error, anything else warning) and passes
the agent's own JSON lines, written by other threads meanwhile, through unchanged. Both go
to the original stderr. With the console renderer (a terminal) nothing is redirected.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from agent.log import json_lines

MAX_LINE = 2000  # characters of one native line kept in its event
_LOG_LINE = re.compile(rb"^(<\d>)?\{.*\}$")  # a JSON log line, with journald's prefix or not
_lock = threading.RLock()
_depth = 0  # nested captures (auto opens runners inside a load) share the outer one


def _level(text: str) -> str:
    head = text.lstrip("[").upper()
    if head.startswith("INFO") or head.startswith("I:"):
        return "info"
    if head.startswith("ERROR") or head.startswith("E:") or head.startswith("FATAL"):
        return "error"
    return "warning"


def _is_log_line(raw: bytes) -> bool:
    if not _LOG_LINE.match(raw):
        return False
    try:
        json.loads(raw[raw.index(b"{"):])
    except ValueError:
        return False
    return True


def _relay(read_fd: int, out_fd: int, runtime: str) -> None:
    """Until EOF: our own log lines through, native lines as events; all to ``out_fd``."""
    config = structlog.get_config()
    stream = os.fdopen(os.dup(out_fd), "w", encoding="utf-8", errors="replace")
    log: Any = structlog.wrap_logger(
        structlog.WriteLogger(stream), processors=config["processors"],
        wrapper_class=config["wrapper_class"], context_class=config["context_class"])
    pending = b""
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop() if chunk else b""
                for raw in lines:
                    raw = raw.rstrip(b"\r")
                    if not raw.strip():
                        continue
                    if _is_log_line(raw):
                        os.write(out_fd, raw + b"\n")
                        continue
                    text = raw.decode("utf-8", errors="replace").strip()[:MAX_LINE]
                    getattr(log, _level(text))("runtime_output", runtime=runtime, line=text)
                if not chunk:
                    return
    finally:
        stream.close()


@contextmanager
def native_stderr_as_events(runtime: str) -> Iterator[None]:
    """Within it, what anything writes to fd 2 reaches the log as events (see the module's
    docstring); a no-op unless the log is JSON lines on stderr."""
    global _depth
    if not json_lines():
        yield
        return
    with _lock:
        if _depth:
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1
            return
        sys.stderr.flush()
        saved = os.dup(2)
        read_fd, write_fd = os.pipe()
        relay = threading.Thread(target=_relay, args=(read_fd, saved, runtime),
                                 name="native-stderr", daemon=True)
        relay.start()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        _depth = 1
        try:
            yield
        finally:
            _depth = 0
            sys.stderr.flush()
            os.dup2(saved, 2)  # the pipe's last write end closes: the relay reads EOF
            relay.join(timeout=10)
            if not relay.is_alive():  # else it still writes there: leave the fd open
                os.close(saved)
