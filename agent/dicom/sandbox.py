"""Decoding in a child process with a memory and a time budget.

Why a process and not only checks: ``agent.dicom.decode`` refuses what it can recognise
before any work (sizes, the pixel budget, codestream headers against the DICOM header,
deflate), but two costs cannot be bounded by checks on the bytes alone. pydicom's parser
does Python work per element, so a payload of a few MiB holding hundreds of thousands of
empty elements takes seconds and hundreds of MiB (measured: 600,000 elements in 4.8 MB,
7.7 s in-process); at the 64 MiB payload cap that is minutes and gigabytes. And the pixel
decoders are C and Rust plugins (openjpeg, libjpeg, pylibjpeg-rle): a crash or a runaway
allocation inside them is out of Python's reach. In a child process the budgets hold
whatever the cause:

* memory: ``RLIMIT_DATA`` set to what the child holds after its imports plus
  ``decode.memory_bytes``; an allocation past it fails (``MemoryError``) in the child;
* time: the daemon waits ``decode.timeout_s`` for the answer, then kills the child;
* a crash (a signal, the kernel's OOM killer) ends only the child.

Each of these reports the scan as ``decode_budget_exceeded`` and the next scan gets a fresh
child. The daemon never parses the payload itself: it gets back the ``Scan`` (the parsed
data set and the pixels). The data set travels as plain tuples, one per element as pydicom
read it (``RawDataElement``'s fields), plus the few elements already converted, and is put
together again in the daemon: a pickled ``Dataset`` costs about twice as much to write and
read. Cost per scan: one socket round trip of small pickles;
the payload goes in and the decoded pixels come back through a buffer both processes map
(a memfd, ``SHARED_BYTES``), so neither is pickled or pushed through the socket. The data
set comes back without its pixel data element and without pydicom's reference to the
payload (the daemon has both; nothing after decoding reads them). A payload or an image
too big for the buffer, or a system without memfd, travels in the pickles as before.
Measured in docs/reliability.md. The child measures its CPU time per scan (every thread
of it, from reading the request to the answer's pickle) and sends it ahead of the answer;
it comes back as ``Scan.decoder_cpu_ms``, so that the stage timings count it as the
agent's work.

The child is a resource boundary, not a security boundary: it runs as the same user, and
the daemon unpickles its answers. Code execution inside a decoder plugin is a different
threat (systemd's sandboxing of the unit is the layer for that).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import BaseTag

from agent.dicom.decode import Scan, ScanRejected, decode_scan
from agent.log import get_logger
from agent.model.bundle import InputContract

log = get_logger("agent.dicom.sandbox")

START_TIMEOUT_S = 120.0  # imports on a slow board; not part of a scan's budget
_READY = b"ready"
# The buffer shared with the child: a payload in, then the decoded float32 pixels out (8 MiB
# holds a 1400 x 1400 image; larger ones travel in the pickles). Pages count only once used.
SHARED_BYTES = 8 << 20
_PIXEL_TAGS = slice(0x7FE00008, 0x7FE00011)  # Float, Double Float and Pixel Data
# The child runs from the folder holding this ``agent`` package (``-m`` puts the working
# directory first on its path), so it runs the same code as the daemon whatever the
# daemon's own working directory holds.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# The Scan fields that travel as they are (the data set and pixels travel otherwise, and
# the CPU time ahead of the answer).
_SENT_FIELDS = tuple(f.name for f in fields(Scan)
                     if f.name not in ("dataset", "pixels", "decoder_cpu_ms"))
_CPU_NS = struct.Struct("<Q")  # ahead of each answer: the child's CPU time spent on it


def _shared_buffer(size: int) -> tuple[int, mmap.mmap] | None:
    """A memfd of ``size`` bytes and its mapping, or None where memfd is missing."""
    try:
        fd = os.memfd_create("iomt-decode")
    except (AttributeError, OSError):
        return None
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except OSError:
        os.close(fd)
        return None


def _strip(scan: Scan) -> None:
    """Drop from the child's answer what the daemon has already or never reads: the pixel
    data element, pydicom's cached pixel array and its reference to the payload."""
    ds = scan.dataset
    del ds[_PIXEL_TAGS]
    ds.buffer = None
    if getattr(ds, "_pixel_array", None) is not None:
        ds._pixel_array = None


_Elements = tuple[list[tuple[Any, ...]], list[DataElement]]


def _elements(ds: Dataset) -> _Elements:
    """A data set's top-level elements: those still as read, as tuples of their fields
    (the tag as an int), and the converted ones as they are."""
    raw: list[tuple[Any, ...]] = []
    converted: list[DataElement] = []
    for elem in ds._dict.values():
        if isinstance(elem, RawDataElement):
            raw.append((int(elem.tag), *elem[1:]))
        else:
            converted.append(elem)
    return raw, converted


def _element_dict(packed: _Elements) -> dict[BaseTag, Any]:
    raw, converted = packed
    out: dict[BaseTag, Any] = {}
    for values in raw:
        tag = BaseTag(values[0])
        out[tag] = RawDataElement(tag, *values[1:])
    for elem in converted:
        out[elem.tag] = elem
    return out


def _pack(ds: Dataset) -> tuple[Any, ...]:
    """What ``_unpack`` needs to rebuild a stripped data set as a ``FileDataset`` (what
    ``dcmread`` gave the child; see the top)."""
    meta = getattr(ds, "file_meta", None)
    return (_elements(ds), _elements(meta if meta is not None else FileMetaDataset()),
            getattr(ds, "preamble", None), ds._read_implicit, ds._read_little,
            ds._read_charset)


def _unpack(packed: tuple[Any, ...]) -> FileDataset:
    elements, meta, preamble, implicit, little, charset = packed
    ds = FileDataset(None, _element_dict(elements), preamble,  # type: ignore[arg-type]
                     FileMetaDataset(_element_dict(meta)), implicit, little)
    ds.set_original_encoding(implicit, little, charset)
    return ds


def _data_bytes() -> int:
    """This process's data segment (VmData: heap and private writable mappings)."""
    with Path("/proc/self/status").open(encoding="ascii") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def _serve(conn: Connection, memory_bytes: int, shared: mmap.mmap | None = None) -> None:
    """The child: decode each payload it is sent, answer with the Scan or the rejection.
    ``shared``: the buffer mapped by the daemon too (a payload sent as its length is read
    from it; pixels that fit are written back into it)."""
    import resource

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    limit = _data_bytes() + memory_bytes
    if Path("/proc/self/status").exists():
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:
        conn.send_bytes(_READY)
        while True:
            request = conn.recv_bytes()
            started = time.process_time_ns()
            payload, contract, pixel_budget, max_payload_bytes, digest = pickle.loads(request)  # noqa: S301 (the daemon's own)
            if isinstance(payload, int):  # its length: the bytes are in the shared buffer
                assert shared is not None
                payload = shared[:payload]
            answer = _answer(payload, contract, pixel_budget, max_payload_bytes, digest, shared)
            conn.send_bytes(_CPU_NS.pack(time.process_time_ns() - started) + answer)
    except (EOFError, OSError):  # the daemon closed its end (it stopped, or gave up on us)
        return


def _answer(payload: bytes, contract: InputContract, pixel_budget: int,
            max_payload_bytes: int, digest: str, shared: mmap.mmap | None) -> bytes:
    """The pickled answer to one request (the child)."""
    try:
        scan = decode_scan(payload, contract, pixel_budget=pixel_budget,
                           max_payload_bytes=max_payload_bytes, payload_sha256=digest)
        _strip(scan)
        pixels = np.ascontiguousarray(scan.pixels, dtype=np.float32)
        rest = {name: getattr(scan, name) for name in _SENT_FIELDS}
        sent: np.ndarray | tuple[int, ...] = pixels
        if shared is not None and pixels.nbytes <= len(shared):
            shared[:pixels.nbytes] = pixels.data.cast("B")
            sent = pixels.shape  # the pixels are in the buffer
        return pickle.dumps(("scan", (_pack(scan.dataset), rest, sent)),
                            protocol=pickle.HIGHEST_PROTOCOL)
    except ScanRejected as exc:
        return pickle.dumps(("rejected", (exc.reason, str(exc))))
    except MemoryError:
        return pickle.dumps(("rejected", ("decode_budget_exceeded",
                                          "decoding needed more than decode.memory_bytes")))
    except RecursionError:  # pickling a data set nested too deeply to hand back
        return pickle.dumps(("rejected", ("decode_budget_exceeded",
                                          "sequences nested too deeply")))


class DecodeProcess:
    """``decode`` has ``decode_scan``'s signature and answers, run in a budgeted child.
    Used from one thread at a time (the daemon's main loop); ``close`` ends the child."""

    def __init__(self, *, memory_bytes: int, timeout_s: float) -> None:
        self.memory_bytes = memory_bytes
        self.timeout_s = timeout_s
        self.restarts = 0  # children replaced after a budget was exceeded
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._shared: mmap.mmap | None = None  # this child's buffer (see SHARED_BYTES)
        self._lock = threading.Lock()
        self._ready = False
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        # A fresh interpreter (not fork: the daemon has threads and paho's sockets), talking
        # over a socket pair in multiprocessing's framing.
        # Each child gets a buffer of its own: a killed child's late writes land in nothing
        # the daemon still reads.
        ours, theirs = socket.socketpair()
        shared = _shared_buffer(SHARED_BYTES)
        fds = (theirs.fileno(), *(() if shared is None else (shared[0],)))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.dicom.sandbox", str(theirs.fileno()),
                 str(self.memory_bytes), *(() if shared is None else (str(shared[0]),))],
                pass_fds=fds, stdin=subprocess.DEVNULL, cwd=_PACKAGE_ROOT)
        finally:
            theirs.close()
            if shared is not None:
                os.close(shared[0])  # the mapping stays
        self._proc, self._conn = proc, Connection(ours.detach())
        self._shared = None if shared is None else shared[1]
        self._ready = False  # its imports overlap the daemon's start; awaited at first use

    def _await_ready(self) -> None:
        assert self._conn is not None and self._proc is not None
        if not self._conn.poll(START_TIMEOUT_S) or self._conn.recv_bytes() != _READY:
            self._proc.kill()
            raise RuntimeError("the decoder process did not start")
        self._ready = True

    def _end(self) -> None:
        try:
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait(5)
        finally:  # the socket and the buffer go even if the child outlives the wait
            if self._conn is not None:
                self._conn.close()
            if self._shared is not None:
                self._shared.close()
            self._proc = self._conn = self._shared = None

    def close(self) -> None:
        with self._lock:
            self._end()

    def decode(self, payload: bytes, contract: InputContract, *, pixel_budget: int,
               max_payload_bytes: int, payload_sha256: str | None = None) -> Scan:
        """Decode in the child; raises ``ScanRejected`` (``decode_budget_exceeded`` when a
        budget was exceeded or the child died)."""
        digest = payload_sha256 or hashlib.sha256(payload).hexdigest()
        if len(payload) > max_payload_bytes:  # not worth a round trip
            return decode_scan(payload, contract, pixel_budget=pixel_budget,
                               max_payload_bytes=max_payload_bytes, payload_sha256=digest)
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._end()
                self._start()
            assert self._conn is not None and self._proc is not None
            why: str | None = None
            try:
                if not self._ready:
                    self._await_ready()
                sent: bytes | int = payload
                if self._shared is not None and len(payload) <= len(self._shared):
                    self._shared[:len(payload)] = payload
                    sent = len(payload)
                self._conn.send_bytes(pickle.dumps(
                    (sent, contract, pixel_budget, max_payload_bytes, digest),
                    protocol=pickle.HIGHEST_PROTOCOL))
                if self._conn.poll(self.timeout_s):
                    answer = self._conn.recv_bytes()
                    (cpu_ns,) = _CPU_NS.unpack_from(answer)
                    kind, value = pickle.loads(memoryview(answer)[_CPU_NS.size:])  # noqa: S301 (see top)
                    if kind == "scan" and isinstance(value[2], tuple):
                        # The pixels are in the buffer: copied out before the next request.
                        assert self._shared is not None
                        shape = value[2]
                        pixels = np.frombuffer(self._shared, np.float32, int(np.prod(shape)))
                        value = (*value[:2], pixels.reshape(shape).copy())
                else:
                    why = f"decoding took longer than decode.timeout_s ({self.timeout_s:g} s)"
            except (EOFError, OSError, RuntimeError):  # RuntimeError: it never started
                try:
                    code: int | None = self._proc.wait(1)
                except subprocess.TimeoutExpired:
                    code = None
                why = ("the decoder process died"
                       + (f" (signal {-code})" if code is not None and code < 0 else ""))
            if why is not None:
                self.restarts += 1
                log.warning("decode_budget_exceeded", detail=why, payload_sha256=digest,
                            restarts=self.restarts, fix="nothing to do: the scan is reported "
                            "and a fresh decoder process serves the next one")
                self._end()
                raise ScanRejected("decode_budget_exceeded", why, digest)
        if kind == "scan":
            packed, rest, pixels = value
            try:
                dataset = _unpack(packed)
            except Exception as exc:  # only ScanRejected leaves decode (the daemon goes on)
                raise ScanRejected("not_dicom", "the decoded data set cannot be rebuilt "
                                   f"({type(exc).__name__})", digest) from None
            return Scan(dataset=dataset, pixels=pixels, decoder_cpu_ms=cpu_ns / 1e6, **rest)
        reason, message = value
        raise ScanRejected(reason, message, digest)


if __name__ == "__main__":  # the child: python -m agent.dicom.sandbox FD MEMORY_BYTES [SHM_FD]
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the daemon, which ends us
    _serve(Connection(int(sys.argv[1])), int(sys.argv[2]),
           mmap.mmap(int(sys.argv[3]), 0) if len(sys.argv) > 3 else None)
