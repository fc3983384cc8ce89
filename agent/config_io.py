"""Reading a TOML file against a pydantic schema, with errors that name each key path
(``agent.config`` and the bundle and contract schemas use these)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import BaseModel, ValidationError

S = TypeVar("S", bound=BaseModel)


class SchemaError(Protocol):
    """What ``validate_toml`` and ``read_text`` raise: ``agent.config.ConfigError`` and
    its subclasses (built from the source and one line per problem)."""

    def __call__(self, source: str, problems: list[str]) -> Exception: ...


def describe_errors(exc: ValidationError, docs: str) -> list[str]:
    """One line per problem, each starting with its key path; ``docs`` is where the keys are
    documented (named for an unknown key)."""
    lines = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error.get("loc", ()) if p != "__root__") or "(top level)"
        kind = str(error.get("type", ""))
        if kind == "extra_forbidden":
            lines.append(f"{loc}: unknown key (check the spelling; see {docs})")
        elif kind == "missing":
            lines.append(f"{loc}: required key is missing")
        else:
            msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            got = error.get("input")  # a whole section (a check across its keys): not shown
            lines.append(f"{loc}: {msg}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
    return lines


def validate_toml(text: str, source: str, schema: type[S], error: SchemaError,
                  docs: str) -> S:
    """Parse TOML text and validate it against ``schema``; raise ``error`` listing every bad
    key path (``docs``: where the keys are documented)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(source, [f"not valid TOML: {exc}"]) from None
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise error(source, describe_errors(exc, docs)) from None


def read_text(path: Path, error: SchemaError) -> str:
    """A TOML file's text, or ``error`` saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise error(str(path), ["is a directory: give the TOML file in it (e.g. "
                                f"{path / 'agent.toml'})"]) from None
    except OSError as exc:
        raise error(str(path), [f"cannot read file: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise error(str(path), ["not a text file: a config is UTF-8 TOML (is this the "
                                "right path?)"]) from None
