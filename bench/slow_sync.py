"""Run a command as if its disk took ``--ms`` milliseconds to make each write durable.

Why: every durable step of the agent (a received scan's insert, a result's commit) ends in
an ``fdatasync``, and on the disks edge nodes boot from that call is slow: an SD card or
eMMC takes milliseconds to tens of milliseconds where this build machine's virtual disk
takes a fraction of one. The benchmarks run on the build machine, so without this they
never see the cost that bounds a node's throughput once its disk, not its model, is the
slowest stage.

How: a small shared library, compiled on first use with the system's C compiler and cached
under ``--dir``, is preloaded (``LD_PRELOAD``) into the command and its children. It wraps
libc's ``fsync`` and ``fdatasync``: each call first sleeps ``IOMT_SYNC_DELAY_US``
microseconds (set from ``--ms``), then does the real call. SQLite, Mosquitto and the
agent's own file writes all sync through those two calls, so all of them pay. The wrapper
counts the calls it delayed; with ``IOMT_SYNC_COUNT_FILE`` set, each process appends
``pid calls`` to that file when it exits.

What it is not: a model of a particular card. The delay is fixed; a real card's varies
with its state and the size of the write. A measurement aid only.

    python bench/slow_sync.py --ms 10 -- python -m bench.e2e --slices 400

Needs ``cc`` (Debian package ``gcc``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long delay_us = -1;
static long calls = 0;

static void wait_like_a_slow_disk(void) {
    if (delay_us < 0) {
        const char *v = getenv("IOMT_SYNC_DELAY_US");
        delay_us = v ? atol(v) : 0;
    }
    __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);
    if (delay_us > 0) {
        struct timespec ts = {delay_us / 1000000, (delay_us % 1000000) * 1000};
        while (nanosleep(&ts, &ts) != 0) {}
    }
}

int fsync(int fd) {
    static int (*real)(int) = NULL;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    wait_like_a_slow_disk();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int) = NULL;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    wait_like_a_slow_disk();
    return real(fd);
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("IOMT_SYNC_COUNT_FILE");
    if (!path || calls == 0) return;
    FILE *f = fopen(path, "a");
    if (f) { fprintf(f, "%d %ld\n", (int)getpid(), calls); fclose(f); }
}
"""


def build(directory: Path) -> Path:
    """The wrapper library, compiled once per source text."""
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    lib = directory / f"slow_sync-{digest}.so"
    if lib.exists():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("slow_sync: no C compiler (install the Debian package gcc)")
    directory.mkdir(parents=True, exist_ok=True)
    src = directory / f"slow_sync-{digest}.c"
    src.write_text(_SOURCE, encoding="ascii")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"],
                   check=True)
    return lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=float, required=True, help="delay before each sync, ms")
    ap.add_argument("--dir", type=Path, default=Path("build/slow_sync"),
                    help="where the wrapper library is compiled and cached")
    ap.add_argument("--count-file", type=Path, default=None,
                    help="append 'pid calls' per process here at exit")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    lib = build(args.dir)
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(lib.resolve()), env.get("LD_PRELOAD")]))
    env["IOMT_SYNC_DELAY_US"] = str(round(args.ms * 1000))
    if args.count_file is not None:
        env["IOMT_SYNC_COUNT_FILE"] = str(args.count_file.resolve())
    print(f"slow_sync: every fsync / fdatasync waits {args.ms:g} ms ({lib})", file=sys.stderr)
    return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
