"""The agent's own work per slice, stage by stage: decode, preprocess, domain, derive, seal.

Runs the real ``Translator`` (decode -> model grid -> normalise -> [model] -> back to the
source grid -> derived instance -> sealed envelope) on the shipped demo slab and on
320-matrix MR series (0.8 mm: resampled; 1.0 mm: cropped), with an identity model in place
of the network so that only the agent's own work is timed. The stage times are the ones the
``Translator`` reports (``Outcome.timings_ms``), as in ``iomt-agent demo``. The identity's
output is far from the bundle's domain reference, so every slice takes the domain check's
flagged path (its warning is logged, to stderr here).

``--isolate`` decodes through the decoder child process (``decode.isolate = true``, the
daemon's default) instead of in-process: with ``--clock cpu`` a slice's decode is then the
daemon thread's CPU time plus the child's CPU time per slice of that round and input (from
/proc/PID/schedstat, so a round average).

With ``--baseline DIR`` (a checkout of another commit, e.g. made by
``git worktree add /tmp/base <commit>``) the same payloads run through that code too, in
a second process; the two take turns round by round (A, B, A, B, ...) so that the noise of
a shared machine falls on both. Reported: per-stage medians per input and the ratio
baseline / this tree.

    python bench/stages.py [--rounds 8] [--baseline DIR] [--clock cpu|wall] [--isolate]
                           [--envelope-version 1|2] [--baseline-envelope-version 1|2]
                           [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

STAGES = ("decode", "preprocess", "domain", "derive", "seal")
ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "models" / "t1w-to-t2w-lite"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = Path("/proc/cpuinfo").read_text()
                extra = "AVX-512 VNNI" if "avx512_vnni" in flags else (
                    "AVX2" if " avx2" in flags else "no AVX2")
                return f"{name} ({extra})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_inputs(workdir: Path) -> dict[str, list[Path]]:
    """The payloads every run reads: the demo slab, and the slab inside a 320 matrix."""
    sys.path.insert(0, str(ROOT))
    from agent.demo.sample_series import build_series, load_demo_slab

    slab = load_demo_slab()
    big = np.zeros((slab.t1.shape[0], 320, 320), dtype=np.uint16)
    big[:, 32:288, 32:288] = slab.t1
    series = {
        "demo-256@1mm": build_series(slab.t1, spacing_mm=slab.spacing_mm),
        "mr-320@0.8mm": build_series(big, spacing_mm=(1.0, 0.8, 0.8)),
        "mr-320@1mm": build_series(big, spacing_mm=(1.0, 1.0, 1.0)),
    }
    out: dict[str, list[Path]] = {}
    for name, payloads in series.items():
        folder = workdir / name.replace("@", "_")
        folder.mkdir(parents=True)
        out[name] = []
        for i, payload in enumerate(payloads):
            path = folder / f"{i:03d}.dcm"
            path.write_bytes(payload)
            out[name].append(path)
    return out


class _ThreadClock:
    """Stands in for the ``time`` module in ``agent.daemon.pipeline``: its stage timer then reads
    this thread's CPU time, which a busy shared machine does not inflate with the time the
    process waits for a core."""

    perf_counter = staticmethod(time.thread_time)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _process_cpu_s(pid: int) -> float:
    """CPU seconds of a single-threaded process: schedstat's nanoseconds where the kernel
    has them (stat's clock ticks are 10 ms), else stat's user + system time."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def child(code: Path, inputs: dict[str, list[str]], clock: str, isolate: bool,
          envelope_version: int = 1) -> None:
    """Serve rounds on stdin/stdout with the ``agent`` package found under ``code``."""
    sys.path.insert(0, str(code))
    import hashlib

    import agent
    import agent.daemon.pipeline
    from agent.backends.base import ModelRunner
    from agent.config import LimitsSection
    from agent.config_budgets import DecodeSection
    from agent.crypto import keys, seal
    from agent.daemon.pipeline import Translator
    from agent.log import configure
    from agent.model.bundle import load_bundle
    from agent.transport.topics import Topics

    class Identity(ModelRunner):
        runtime = "identity"

        def run(self, batch: Any) -> Any:
            return batch[:, :1].copy()

    _, recipient = keys.generate_recipient_keypair()
    device_key = keys.generate_signing_key()

    # (version 1 is every checkout's default: an older baseline's seal has no ``version``)
    version: dict[str, Any] = {} if envelope_version == 1 else {"version": envelope_version}

    def sealer(plaintext: bytes, message_id: str) -> bytes:
        return seal.seal(plaintext, recipient=recipient, signing_key=device_key,
                         device_id="bench", message_id=message_id, **version)

    configure("info", "json", stream=sys.stderr)  # stdout carries the rounds
    if clock == "cpu":
        setattr(agent.daemon.pipeline, "time", _ThreadClock())  # noqa: B010 - the stage timer reads it
    box = None
    if isolate:
        from agent.dicom.sandbox import DecodeProcess

        section = DecodeSection()
        box = DecodeProcess(memory_bytes=section.memory_bytes, timeout_s=section.timeout_s)
    translator = Translator(load_bundle(BUNDLE), Identity(), sealer, limits=LimitsSection(),
                            topics=Topics("bench", "bench"))
    if box is not None:
        translator.decoder = box.decode
    payloads = {name: [Path(p).read_bytes() for p in paths] for name, paths in inputs.items()}
    digests = {name: [hashlib.sha256(p).hexdigest() for p in ps] for name, ps in payloads.items()}
    print(json.dumps({"ready": str(Path(agent.__file__).parent)}), flush=True)
    for _command in sys.stdin:
        result: dict[str, dict[str, list[float]]] = {}
        for name, items in payloads.items():
            times: dict[str, list[float]] = {s: [] for s in STAGES}
            c0 = _process_cpu_s(box.pid) if box is not None and box.pid else 0.0
            for payload, digest in zip(items, digests[name], strict=True):
                outcome = translator.process(payload, "iomt/bench/scans/x", digest)
                if not outcome.ok:
                    raise SystemExit(f"{name}: {outcome.reason}")
                for stage in STAGES:
                    times[stage].append(outcome.timings_ms.get(stage, 0.0))
            if box is not None and box.pid and clock == "cpu":
                share = (_process_cpu_s(box.pid) - c0) / len(items) * 1000
                times["decode"] = [t + share for t in times["decode"]]
            result[name] = times
        print(json.dumps(result), flush=True)


class Runner:
    """One child process serving rounds."""

    def __init__(self, label: str, code: Path, inputs: dict[str, list[Path]],
                 clock: str, isolate: bool, envelope_version: int = 1) -> None:
        spec = json.dumps({k: [str(p) for p in v] for k, v in inputs.items()})
        self.label = label
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", str(code), "--inputs", spec,
             "--clock", clock, *(["--isolate"] if isolate else []),
             "--envelope-version", str(envelope_version)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.code = json.loads(self._line())["ready"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.label}: the benchmark process ended")
        return line

    def round(self) -> dict[str, dict[str, list[float]]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        result: dict[str, dict[str, list[float]]] = json.loads(self._line())
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: the thread's CPU time per stage (robust on a shared "
                        "machine; the default); wall: elapsed time, as the agent logs it")
    parser.add_argument("--isolate", action="store_true",
                        help="decode in the decoder child process, as the daemon does by "
                        "default (decode.isolate = true)")
    parser.add_argument("--envelope-version", type=int, choices=(1, 2), default=1,
                        help="the envelope version this tree seals (seal.envelope_version)")
    parser.add_argument("--baseline-envelope-version", type=int, choices=(1, 2), default=1,
                        help="the baseline's (with --baseline .: this tree, v1 against v2)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, json.loads(args.inputs), args.clock, args.isolate,
              args.envelope_version)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_inputs(Path(tmp))
        runners = [Runner("this tree", ROOT, inputs, args.clock, args.isolate,
                          args.envelope_version)]
        if args.baseline:
            runners.append(Runner("baseline", args.baseline.resolve(), inputs, args.clock,
                                  args.isolate, args.baseline_envelope_version))
        samples: dict[str, dict[str, dict[str, list[float]]]] = {
            r.label: {n: {s: [] for s in STAGES} for n in inputs} for r in runners}
        for r in runners:
            r.round()  # warm-up: imports, first templates, caches
        for i in range(args.rounds):
            for r in runners if i % 2 == 0 else runners[::-1]:
                for name, stages in r.round().items():
                    for stage, values in stages.items():
                        samples[r.label][name][stage] += values
        for r in runners:
            r.close()

    # "total" is the sum of the stage medians: on a shared machine nearly every slice has
    # a stall in some stage, so a median of per-slice sums measures the neighbours.
    medians = {label: {name: {s: statistics.median(v) for s, v in st.items()}
                       for name, st in by_input.items()}
               for label, by_input in samples.items()}
    for by_input in medians.values():
        for row in by_input.values():
            row["total"] = sum(row[s] for s in STAGES)
    print(f"CPU: {_cpu()}; {args.rounds} rounds, slices per input: "
          f"{', '.join(f'{n} {len(p)}' for n, p in inputs.items())}; medians in ms of "
          f"{'thread CPU time' if args.clock == 'cpu' else 'wall time'}; decode "
          f"{'in the decoder process' if args.isolate else 'in-process'}")
    head = f"{'input':<14} {'code':<10}" + "".join(f"{s:>11}" for s in (*STAGES, "total"))
    print(head)
    print("-" * len(head))
    for name in inputs:
        for r in runners:
            row = medians[r.label][name]
            print(f"{name:<14} {r.label[:10]:<10}"
                  + "".join(f"{row[s]:>11.3f}" for s in (*STAGES, "total")))
        if args.baseline:
            new, old = medians["this tree"][name], medians["baseline"][name]
            print(f"{'':<14} {'ratio':<10}" + "".join(
                f"{old[s] / new[s]:>10.1f}x" for s in (*STAGES, "total")))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "cpu": _cpu(), "rounds": args.rounds, "clock": args.clock, "isolate": args.isolate,
            "envelope_version": {"this tree": args.envelope_version,
                                 "baseline": args.baseline_envelope_version},
            "code": {r.label: r.code for r in runners},
            "medians_ms": medians,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
