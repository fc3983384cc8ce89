"""The runtimes' native output at model load stays off the JSON log stream: a subprocess
logs JSON lines (as the daemon does under systemd) while LiteRT and onnxruntime load the
shipped models, and another thread logs meanwhile; every line it writes parses as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.bundles import MODELS_DIR

REPO = Path(__file__).resolve().parents[2]
LITE = MODELS_DIR / "t1w-to-t2w-lite"

SCRIPT = textwrap.dedent(f"""
    import threading
    import numpy as np
    from agent.log import configure, get_logger
    from agent.backends import RunnerOptions, open_runner

    configure("info", "json")
    log = get_logger("test")
    stop = threading.Event()

    def chatter():  # another thread logging while the runtimes load (a reload does that)
        i = 0
        while not stop.is_set():
            log.info("tick", i=i)
            i += 1
            stop.wait(0.001)
        log.info("ticks", count=i)

    thread = threading.Thread(target=chatter)
    thread.start()
    runners = [open_runner("litert", {str(LITE / "model.int8.tflite")!r}, RunnerOptions()),
               open_runner("onnxruntime", {str(LITE / "model.int8.onnx")!r}, RunnerOptions())]
    for runner in runners:
        runner.run(np.zeros((1, 1, 256, 256), np.float32))
    stop.set()
    thread.join()
    log.info("done")
""")


def _events(text: str) -> list[dict[str, object]]:
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return events


def test_native_runtime_output_becomes_json_events() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = _events(proc.stdout) + _events(proc.stderr)
    native = [e for e in events if e["event"] == "runtime_output"]
    assert any(e["runtime"] == "litert" and "XNNPACK" in str(e["line"]) for e in native), native
    assert all(e["level"] == "info" for e in native if str(e["line"]).startswith("INFO"))
    ticks = [e for e in events if e["event"] == "tick"]
    count = next(e["count"] for e in events if e["event"] == "ticks")
    assert len(ticks) == count  # none lost or mangled while fd 2 was the pipe
    assert events[-1]["event"] == "done"


def test_console_logging_leaves_stderr_alone() -> None:
    script = SCRIPT.replace('configure("info", "json")', 'configure("info", "console")')
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "INFO: Created TensorFlow Lite XNNPACK delegate" in proc.stderr
    assert "runtime_output" not in proc.stderr
