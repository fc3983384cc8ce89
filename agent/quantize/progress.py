"""Progress on stderr: a bar redrawn in place on a TTY, one plain line per stage otherwise
(logs, CI). No dependency."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

BAR_WIDTH = 28
REDRAW_S = 0.1


class Stage:
    """One stage with ``total`` steps (None: unknown); ``tick`` advances it."""

    def __init__(self, label: str, total: int | None, stream: TextIO, tty: bool) -> None:
        self.label, self.total, self.done = label, total, 0
        self._stream, self._tty = stream, tty
        self._start = self._drawn = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self._tty and time.monotonic() - self._drawn >= REDRAW_S:
            self._draw()

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        if self.total:
            filled = min(BAR_WIDTH, BAR_WIDTH * self.done // self.total)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            text = f"{self.label:<24} [{bar}] {self.done}/{self.total}"
        else:
            text = f"{self.label:<24} {self.done}"
        self._stream.write(f"\r{text} {self.elapsed_s:6.1f}s\x1b[K")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty:
            self._draw()
            self._stream.write("\n")
        else:
            count = f" ({self.done})" if self.done else ""
            self._stream.write(f"quantize: {self.label} done{count} in {self.elapsed_s:.1f} s\n")
        self._stream.flush()


class Progress:
    """Stages on ``stream`` (stderr): a bar when it is a TTY, plain lines otherwise."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty

    @contextmanager
    def stage(self, label: str, total: int | None = None) -> Iterator[Stage]:
        """A stage for the duration of the ``with`` block."""
        stage = Stage(label, total, self.stream, self.tty)
        if not self.tty:
            self.stream.write(f"quantize: {label}{f' ({total})' if total else ''}...\n")
            self.stream.flush()
        try:
            yield stage
        finally:
            stage.finish()

    def note(self, text: str) -> None:
        """A line of its own (never inside a bar)."""
        self.stream.write(f"quantize: {text}\n")
        self.stream.flush()
