"""What sealing one result costs, per suite: HPKE encryption with AES-256-GCM against
ChaCha20-Poly1305, and the Ed25519 signature (over the envelope, version 1, or over its
SHA-256, version 2), with the CPU's AES instructions and (on x86) without them.

Why: ``seal.aead = "auto"`` seals with ChaCha20-Poly1305 on a CPU without AES instructions
(a Raspberry Pi 4's Cortex-A72). No such CPU is at hand on an x86 build machine, so the
second column runs the same code with OpenSSL told that the CPU has no AES-NI and no
PCLMULQDQ (``OPENSSL_ia32cap``): OpenSSL then takes its constant-time software AES and
GHASH, the kind of path a Pi 4 runs. It is a stand-in for the code path, not for a Pi 4's
speed (a Cortex-A72 at 1.8 GHz is slower still).

Each configuration runs in its own process; the processes take turns (A, B, A, B, ...) and
inside one the suites alternate slice by slice, so a shared machine's noise falls on all
of them. Reported: medians in ms of thread CPU time per slice, and ratios.

    python -m bench.seal [--rounds 6] [--slices 200] [--bytes 133000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
AEADS = ("aes-256-gcm", "chacha20-poly1305")
KINDS = ("mlkem768-x25519", "x25519")
# CPUID(1).ECX bits 25 (AES-NI) and 1 (PCLMULQDQ), as OpenSSL's first capability word
# holds them (ECX in its upper half): "~" clears them.
NO_AES_NI = "~0x200000200000000"
PARTS = ("seal", "hpke", "sign", "seal_v2")


def child(slices: int, size: int) -> None:
    """Time ``seal`` and its two halves for every suite; print one JSON line."""
    sys.path.insert(0, str(ROOT))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.crypto import keys, seal

    plaintext = os.urandom(size)
    device = Ed25519PrivateKey.generate()
    recipients = {k: keys.generate_recipient_keypair(k)[1] for k in KINDS}  # type: ignore[arg-type]
    out: dict[str, dict[str, list[float]]] = {
        f"{k} {a}": {p: [] for p in PARTS} for k in KINDS for a in AEADS}
    for i in range(slices + 5):  # the first 5 warm up
        for kind in KINDS:
            for aead in AEADS if i % 2 == 0 else AEADS[::-1]:
                r = recipients[kind]
                t0 = time.thread_time()
                envelope = seal.seal(plaintext, recipient=r, signing_key=device,
                                     device_id="bench", message_id=f"m-{i}",
                                     aead=aead)  # type: ignore[arg-type]
                t1 = time.thread_time()
                seal.hpke_suite(r.kind, aead).encrypt(  # type: ignore[arg-type]
                    plaintext, r.hpke_key(), info=b"bench")
                t2 = time.thread_time()
                device.sign(envelope[:-64])
                t3 = time.thread_time()
                seal.seal(plaintext, recipient=r, signing_key=device, device_id="bench",
                          message_id=f"m-{i}", aead=aead, version=2)  # type: ignore[arg-type]
                t4 = time.thread_time()
                if i >= 5:
                    row = out[f"{kind} {aead}"]
                    row["seal"].append((t1 - t0) * 1e3)
                    row["hpke"].append((t2 - t1) * 1e3)
                    row["sign"].append((t3 - t2) * 1e3)
                    row["seal_v2"].append((t4 - t3) * 1e3)
    print(json.dumps(out), flush=True)


def _cpu() -> str:
    sys.path.insert(0, str(ROOT))
    from agent.cpu import read_cpu

    cpu = read_cpu()
    return f"{cpu.label}; AES instructions: {'yes' if cpu.aes else 'no'}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="turns per configuration")
    ap.add_argument("--slices", type=int, default=100, help="envelopes per suite per turn")
    ap.add_argument("--bytes", type=int, default=133_000,
                    help="plaintext size (a derived 256 x 256 instance: about 133 kB)")
    ap.add_argument("--json", type=Path, default=Path("bench-out/seal.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.slices, args.bytes)
        return 0

    configs: dict[str, dict[str, str]] = {"AES instructions": {}}
    if platform.machine().lower() in ("x86_64", "amd64"):
        configs["no AES-NI"] = {"OPENSSL_ia32cap": NO_AES_NI}
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    for i in range(args.rounds):
        for label in list(configs) if i % 2 == 0 else list(configs)[::-1]:
            env = {**os.environ, **configs[label]}
            line = subprocess.run(
                [sys.executable, "-m", "bench.seal", "--child", "--slices", str(args.slices),
                 "--bytes", str(args.bytes)],
                cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
            for suite, parts in json.loads(line).items():
                into = samples.setdefault(label, {}).setdefault(suite, {p: [] for p in PARTS})
                for part, values in parts.items():
                    into[part] += values

    medians = {label: {suite: {p: statistics.median(v) for p, v in parts.items()}
                       for suite, parts in by_suite.items()}
               for label, by_suite in samples.items()}
    print(f"CPU: {_cpu()}; {args.rounds} turns x {args.slices} envelopes of {args.bytes} "
          "bytes per suite; medians in ms of thread CPU time")
    head = (f"{'CPU path':<17} {'suite (KEM, AEAD)':<34} {'seal v1':>8} {'of which HPKE':>14} "
            f"{'Ed25519':>8} {'seal v2':>8}")
    print(head)
    print("-" * len(head))
    for label, by_suite in medians.items():
        for suite, row in by_suite.items():
            print(f"{label:<17} {suite:<34} {row['seal']:>8.3f} {row['hpke']:>14.3f} "
                  f"{row['sign']:>8.3f} {row['seal_v2']:>8.3f}")
    ratios: dict[str, Any] = {}
    for label, by_suite in medians.items():
        for kind in KINDS:
            aes, chacha = by_suite[f"{kind} aes-256-gcm"], by_suite[f"{kind} chacha20-poly1305"]
            ratios[f"{label}: {kind} seal, chacha20 / aes"] = round(
                chacha["seal"] / aes["seal"], 3)
            ratios[f"{label}: {kind} aes seal, envelope v2 / v1"] = round(
                aes["seal_v2"] / aes["seal"], 3)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": _cpu(), "bytes": args.bytes, "rounds": args.rounds,
                                     "slices": args.slices, "medians_ms": medians,
                                     "ratios": ratios}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
