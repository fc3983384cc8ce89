"""The arm64 Debian rootfs of the CPU matrix: built once with debootstrap, cached, and
entered with chroot under qemu-aarch64 (binfmt_misc).

Cached under ``cache_dir()`` (``$IOMT_CPU_CACHE``, default ``~/.cache/iomt-agent/cpus``),
outside the git clone so that a fresh CI clone on the same machine reuses it:

* ``rootfs-arm64-bookworm/``: ``debootstrap --foreign --variant=minbase`` plus the second
  stage under qemu; complete only once its stamp file is written (a half-built one is
  thrown away and rebuilt);
* ``/opt/venv`` inside it: the project's dependencies, reinstalled when ``pyproject.toml``
  changes (its digest is the venv's stamp);
* ``pip-arm64/``: pip's wheel cache, bind-mounted so that a rebuilt rootfs keeps it.

Inside the rootfs pip uses the host's own pip configuration: its config files, its CA
bundle and the local paths that configuration names (find-links, local indexes,
constraints) are copied or bind-mounted at the same paths. The Debian mirror is the host's
own (``apt-get indextargets``), or ``$IOMT_CPU_MIRROR``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

SUITE = "bookworm"
INCLUDE = "python3-venv,ca-certificates"  # python3-venv brings python3 and pip's wheel
STAMP = ".iomt-rootfs-complete"
VENV = "/opt/venv"
SRC = "/src"
EXTRAS = "tflite,quantize"
TEST_PACKAGES = ("pytest>=8", "pytest-timeout>=2.3")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_AARCH64 = Path("/usr/bin/qemu-aarch64-static")
PIP_CONFIG_FILES = (Path("/etc/pip.conf"), Path("/etc/xdg/pip"))


class SetupError(RuntimeError):
    """The emulation environment cannot be built here (what to install or fix is said)."""


def cache_dir() -> Path:
    return Path(os.environ.get("IOMT_CPU_CACHE") or Path.home() / ".cache/iomt-agent/cpus")


def root_dir() -> Path:
    return cache_dir() / f"rootfs-arm64-{SUITE}"


def log(message: str) -> None:
    print(f"cpu-matrix: {message}", file=sys.stderr, flush=True)


def sh(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    """Run a setup command, its output on our stderr; a failure is a ``SetupError``."""
    done = subprocess.run([str(c) for c in cmd], env=env, stdout=sys.stderr, check=False)
    if done.returncode != 0:
        raise SetupError(f"{' '.join(map(str, cmd))} exited with {done.returncode}")


def ensure_binfmt() -> None:
    """qemu-aarch64 registered with binfmt_misc, so the kernel runs arm64 binaries (every
    exec inside the chroot) through it. The registration is the qemu-user-static package's
    own line, with its F flag: the interpreter is opened now, so it works inside a chroot."""
    if not QEMU_AARCH64.exists():
        raise SetupError(f"{QEMU_AARCH64} is missing: apt-get install qemu-user-static")
    if not (BINFMT / "status").exists():
        sh("mount", "binfmt_misc", "-t", "binfmt_misc", BINFMT)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        if shutil.which("update-binfmts"):
            sh("update-binfmts", "--enable", "qemu-aarch64")
        else:
            line = Path("/usr/lib/binfmt.d/qemu-aarch64.conf").read_text().strip()
            (BINFMT / "register").write_text(line)
    if entry.read_text().splitlines()[0].strip() != "enabled":
        entry.write_text("1")


def host_mirror() -> str:
    """The Debian mirror this host's apt uses for the suite (so no host name is baked in)."""
    if os.environ.get("IOMT_CPU_MIRROR"):
        return os.environ["IOMT_CPU_MIRROR"]
    out = subprocess.run(["apt-get", "indextargets", "--format", "$(SITE) $(RELEASE)"],
                         capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        site, _, release = line.partition(" ")
        if release.strip() == SUITE:
            return site
    raise SetupError(f"no Debian {SUITE} mirror in this host's apt sources: set IOMT_CPU_MIRROR")


def ensure_rootfs() -> Path:
    """The cached rootfs, built when missing or incomplete (about 7 minutes cold)."""
    root = root_dir()
    if (root / STAMP).exists():
        return root
    if not shutil.which("debootstrap") and not Path("/usr/sbin/debootstrap").exists():
        raise SetupError("debootstrap is missing: apt-get install debootstrap")
    if root.exists():
        log(f"removing an incomplete rootfs at {root}")
        unmount_below(root)
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    mirror = host_mirror()
    log(f"building the arm64 {SUITE} rootfs in {root} (first stage: download)")
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    sh(debootstrap, "--foreign", "--arch=arm64", "--variant=minbase", f"--include={INCLUDE}",
       SUITE, root, mirror)
    # A copy of the emulator inside, in case binfmt was registered without the F flag.
    shutil.copy2(QEMU_AARCH64, root / "usr/bin" / QEMU_AARCH64.name)
    libexec = root / "usr/libexec/qemu-binfmt"
    libexec.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (libexec / "aarch64-binfmt-P").symlink_to(f"../../bin/{QEMU_AARCH64.name}")
    log("second stage under qemu-aarch64 (unpacks and configures every package)")
    sh("chroot", root, "/debootstrap/debootstrap", "--second-stage", env=_chroot_env({}))
    (root / STAMP).write_text(f"{SUITE} arm64 from {mirror}\n")
    return root


def mounts_below(root: Path) -> list[str]:
    """Mount points at or under ``root``, deepest first."""
    prefix = str(root.resolve())
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_below(root: Path) -> None:
    """Unmount whatever is mounted at or under ``root`` (left by a killed run). Raises
    ``SetupError`` if something stays mounted: the host's /dev or package indexes must
    never be reachable through the rootfs when it is deleted or rebuilt."""
    for point in mounts_below(root):
        subprocess.run(["umount", "-l", point], check=False)
    left = mounts_below(root)
    if left:
        raise SetupError(f"could not unmount {', '.join(left)}: unmount them by hand")


def copy_source(repo: Path, root: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored) at /src."""
    dest = root / SRC.lstrip("/")
    if dest.exists():
        shutil.rmtree(dest)
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-co",
                             "--exclude-standard"], capture_output=True, check=False)
    if listed.returncode != 0:
        raise SetupError(f"{repo} is not a git work tree (git ls-files failed)")
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = repo / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _pip_paths() -> list[Path]:
    """Host paths named by pip's configuration (files, find-links, file:// indexes)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                         capture_output=True, text=True, check=False).stdout
    values = out.splitlines() + [v for k, v in os.environ.items() if k.startswith("PIP_")]
    paths = []
    for value in values:
        for token in re.split(r"[\s='\"]+", value.partition("=")[2] if "=" in value else value):
            path = Path(token.removeprefix("file://"))
            if path.name == "simple":  # a local index: its pages link to ../../files/...
                path = path.parent
            if path.is_absolute() and path.exists() and path not in paths:
                paths.append(path)
    return paths


def _chroot_env(extra: dict[str, str]) -> dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    env.update(extra)
    return env


class Chroot:
    """The mounted rootfs: /proc, /dev, /sys, the pip cache and pip's host paths, and an
    arm64 /proc/cpuinfo over the host's (onnxruntime's cpuinfo reader crashes on an x86
    one). ``close`` unmounts everything, also after a failure."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounted: list[Path] = []

    def _mount(self, *args: str, target: Path) -> None:
        sh("mount", *args, target)
        self.mounted.append(target)

    def open(self) -> None:
        unmount_below(self.root)
        r = self.root
        self._mount("-t", "proc", "proc", target=r / "proc")
        self._mount("--bind", "/dev", target=r / "dev")
        self._mount("--bind", "/sys", target=r / "sys")
        for name in ("resolv.conf", "hosts"):
            with contextlib.suppress(OSError):
                shutil.copy2(Path("/etc") / name, r / "etc" / name)
        for conf in PIP_CONFIG_FILES:  # pip's own configuration, as on the host
            if conf.is_dir():
                shutil.copytree(conf, r / conf.relative_to("/"), dirs_exist_ok=True)
            elif conf.is_file():
                shutil.copy2(conf, r / conf.relative_to("/"))
        for path in _pip_paths():
            inside = r / path.relative_to("/")
            if path.is_file():  # a CA bundle or a constraints file: a copy will do
                inside.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, inside)
            elif not path.is_relative_to("/etc"):
                inside.mkdir(parents=True, exist_ok=True)
                self._mount("--bind", "-o", "ro", str(path), target=inside)
        pip_cache = cache_dir() / "pip-arm64"
        pip_cache.mkdir(parents=True, exist_ok=True)
        (r / "root/.cache/pip").mkdir(parents=True, exist_ok=True)
        self._mount("--bind", str(pip_cache), target=r / "root/.cache/pip")

    def set_cpuinfo(self, text: str, core: str) -> None:
        """Show ``text`` as /proc/cpuinfo inside (replacing an earlier one)."""
        target = self.root / "proc/cpuinfo"
        if target in self.mounted:
            subprocess.run(["umount", target], check=False)
            self.mounted.remove(target)
        fake = cache_dir() / f"cpuinfo-{core}"
        fake.write_text(text)
        self._mount("--bind", str(fake), target=target)

    def close(self) -> None:
        for target in reversed(self.mounted):
            subprocess.run(["umount", "-l", target], check=False)
        self.mounted.clear()

    def run(self, *cmd: str, env: dict[str, str] | None = None, capture: bool = False,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """``cmd`` inside the chroot, working directory /src."""
        return subprocess.run(
            ["chroot", str(self.root), "/bin/sh", "-c", 'cd "$0" && exec "$@"', SRC, *cmd],
            env=_chroot_env(env or {}), text=True, check=False, timeout=timeout,
            stdout=subprocess.PIPE if capture else sys.stderr)


def deps_digest(repo: Path) -> str:
    text = (repo / "pyproject.toml").read_bytes() + repr((EXTRAS, TEST_PACKAGES)).encode()
    return hashlib.sha256(text).hexdigest()


def ensure_venv(chroot: Chroot, repo: Path) -> None:
    """/opt/venv with the project's dependencies (from the /src copy); redone when
    pyproject.toml changes. The code itself is always run from /src, not from the venv."""
    stamp = chroot.root / VENV.lstrip("/") / ".iomt-deps"
    digest = deps_digest(repo)
    if stamp.exists() and stamp.read_text().strip() == digest:
        return
    log(f"installing the project's dependencies in the rootfs ({VENV}, pip under qemu)")
    fresh = not (chroot.root / VENV.lstrip("/") / "bin/python").exists()
    if fresh and chroot.run("/usr/bin/python3", "-m", "venv", VENV).returncode != 0:
        raise SetupError("python3 -m venv failed in the rootfs")
    done = chroot.run(f"{VENV}/bin/python", "-m", "pip", "install", "--quiet",
                      f"{SRC}[{EXTRAS}]", *TEST_PACKAGES, env={"QEMU_CPU": "cortex-a72"})
    if done.returncode != 0:
        raise SetupError("pip install of the project in the rootfs failed (see above)")
    stamp.write_text(digest + "\n")
