"""Where fleet bundles live on the node, and the atomic switch between them.

Under ``{state_dir}/fleet/``: ``staging/`` (downloads and unpacking, emptied at each
attempt), ``bundles/{key}/`` (unpacked bundles that passed the checks; ``key``: the first
16 hex digits of the target's sha256), and two symlinks, ``current`` (the bundle that
serves; a restart comes up on it) and ``previous`` (the one before, kept for a rollback).
A switch writes a new symlink beside the old one and renames it over ``current``: a power
cut leaves either the old or the new link, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


class BundleStore:
    """The fleet directory of one node."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "fleet"
        self.staging = self.root / "staging"
        self.bundles = self.root / "bundles"
        self.metadata = self.root / "tuf"  # ngclient's trusted metadata

    def prepare(self) -> None:
        for d in (self.root, self.bundles, self.metadata):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.clear_staging()

    def clear_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, mode=0o700)

    def _link(self, name: str) -> Path | None:
        link = self.root / name
        if not link.is_symlink():
            return None
        target = (self.root / link.readlink()).resolve()
        return target if (target / "bundle.json").is_file() else None

    @property
    def current(self) -> Path | None:
        """The bundle directory that serves, or None (no fleet update activated yet)."""
        return self._link("current")

    @property
    def previous(self) -> Path | None:
        """The bundle that served before ``current`` (a fleet bundle), or None."""
        return self._link("previous")

    def roll_back(self) -> None:
        """``previous`` serves again (no previous: the configured bundle, so ``current``
        goes); the failed bundle is removed."""
        failed, back = self.current, self.previous
        if back is not None:
            self._swap_link("current", back)
            (self.root / "previous").unlink()
        else:
            (self.root / "current").unlink(missing_ok=True)
            self._sync()
        if failed is not None and failed != back:
            shutil.rmtree(failed, ignore_errors=True)

    @property
    def current_key(self) -> str | None:
        current = self.current
        return current.name if current is not None else None

    def install(self, unpacked: Path, key: str) -> Path:
        """Move a checked, unpacked bundle from staging to ``bundles/{key}``."""
        dest = self.bundles / key
        if dest.exists() and dest != self.current:
            shutil.rmtree(dest)
        if not dest.exists():
            unpacked.rename(dest)  # same file system: atomic
        return dest

    def activate(self, bundle: Path) -> None:
        """Make ``bundle`` (under ``bundles/``) the one that serves; the one before becomes
        ``previous``; others are removed."""
        old = self.current
        if old is not None and old != bundle:
            self._swap_link("previous", old)
        self._swap_link("current", bundle)
        keep = {bundle, old}
        for entry in self.bundles.iterdir():
            if entry.resolve() not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def discard(self, bundle: Path) -> None:
        """Remove a bundle that was refused (never the serving one)."""
        if bundle != self.current and bundle != self._link("previous"):
            shutil.rmtree(bundle, ignore_errors=True)

    def _swap_link(self, name: str, target: Path) -> None:
        tmp = self.root / f".{name}.new"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(target.relative_to(self.root))
        tmp.replace(self.root / name)
        self._sync()

    def _sync(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable before we say "active"
        finally:
            os.close(fd)
