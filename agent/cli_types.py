"""Argument types for the ``iomt-agent`` parsers: numbers checked where they are read, so
``--canary 0`` or ``--timeout -1`` is a usage error (exit 2) that says what is allowed,
not a silent surprise or a traceback later."""

from __future__ import annotations

import argparse


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value})")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (0: the default or automatic choice)."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def positive_float(text: str) -> float:
    """Seconds and the like: a finite number > 0."""
    value = float(_number(text, float))
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 (got {text})")
    return value

