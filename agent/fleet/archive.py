"""A bundle as a tar: packed by the operator, unpacked by the node as hostile input.

``pack_bundle`` writes a plain (uncompressed: no decompression bomb to defuse) ustar of a
bundle directory's regular files, in name order with fixed owner, mode and time, so the
same bundle always gives the same bytes (and so the same TUF target). ``extract_bundle``
accepts only regular files and directories below the destination, within a file-count and
a byte cap, and extracts through tarfile's ``data`` filter as a second line.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath

from agent.fleet.verdict import UpdateRejected

MAX_FILES = 256
MAX_BYTES = 512 * 1024 * 1024


def pack_bundle(bundle: Path) -> bytes:
    """The bundle directory as tar bytes. A symlink or special file in it is an error."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(bundle.rglob("*")):
            rel = path.relative_to(bundle).as_posix()
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise UpdateRejected("unsafe_archive", f"{path}: only regular files and "
                                     "directories go into a fleet bundle")
            info = tarfile.TarInfo(rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = path.stat().st_size, 0o644
                with path.open("rb") as f:
                    tar.addfile(info, f)
    return out.getvalue()


def _check(member: tarfile.TarInfo) -> None:
    name = PurePosixPath(member.name)
    if not (member.isfile() or member.isdir()):
        raise UpdateRejected("unsafe_archive", f"archive member {member.name!r} is a link or "
                             "a device: only regular files and directories are accepted")
    if name.is_absolute() or ".." in name.parts or "\\" in member.name or not member.name:
        raise UpdateRejected("unsafe_archive", f"archive member {member.name!r} points "
                             "outside the staging directory")


def extract_bundle(tar_path: Path, dest: Path, *, max_files: int = MAX_FILES,
                   max_bytes: int = MAX_BYTES) -> Path:
    """Unpack ``tar_path`` into the new directory ``dest``; ``UpdateRejected``
    (``unsafe_archive``) for anything but plain files and directories inside it, or past
    the caps."""
    dest.mkdir(parents=True)
    members: list[tarfile.TarInfo] = []
    total = 0
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                if len(members) >= max_files:
                    raise UpdateRejected("unsafe_archive",
                                         f"the archive holds more than {max_files} entries")
                _check(member)
                total += member.size
                if total > max_bytes:
                    raise UpdateRejected("unsafe_archive", f"the archive unpacks to more "
                                         f"than {max_bytes} bytes")
                members.append(member)
            tar.extractall(dest, members=members, filter="data")
    except tarfile.TarError as exc:  # FilterError included: the data filter's refusal
        raise UpdateRejected("unsafe_archive", f"the archive cannot be unpacked safely: "
                             f"{exc}") from None
    return dest
