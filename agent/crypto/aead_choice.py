"""Which AEAD seals this node's results: ``seal.aead`` resolved against the CPU.

AES-256-GCM is the fastest AEAD there is on a CPU with AES and carry-less multiply
instructions (x86 AES-NI and PCLMULQDQ, the ARMv8 crypto extensions' AES and PMULL). Without
them OpenSSL falls back to constant-time software AES, and ChaCha20-Poly1305, built from the
additions, rotations and xors that NEON and AVX2 do well, is several times faster. That is
why TLS stacks put ChaCha20 first on such devices, and the edge has them: a Raspberry Pi 4's
Cortex-A72 (BCM2711) lacks the crypto extensions; a Pi 5, a Jetson and current x86 have them.

``bench/seal.py`` measures both, and on x86 also with OpenSSL's AES instructions switched off
(``OPENSSL_ia32cap``) as a stand-in for such a CPU. On a 2.1 GHz Xeon (family 6, model 207)
135 kB took AES-256-GCM 0.02 ms with AES-NI and 0.8-0.9 ms without, ChaCha20-Poly1305 0.06
and 0.17-0.20 ms; the whole seal (with the Ed25519 signature) 1.7-1.8 ms with software
AES-GCM against 1.1-1.3 ms with ChaCha20-Poly1305 (two runs).

Both are HPKE AEADs of RFC 9180, named in the envelope's ``suite``; the receiver opens either.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import AeadSetting
from agent.cpu import CpuInfo, read_cpu
from agent.crypto.seal import Aead


@dataclass(frozen=True)
class AeadChoice:
    """The AEAD this node seals with, and why (for the status and the log)."""

    aead: Aead
    reason: str


def choose_aead(setting: AeadSetting, cpu: CpuInfo | None = None) -> AeadChoice:
    """``seal.aead`` resolved: a named AEAD as it is; ``auto``: AES-256-GCM where ``cpu``
    (this machine's when None) has AES instructions, else ChaCha20-Poly1305."""
    if setting != "auto":
        return AeadChoice(setting, "set by seal.aead")
    cpu = cpu or read_cpu()
    if cpu.aes:
        return AeadChoice("aes-256-gcm", f"seal.aead = auto: {cpu.model} has AES "
                          "instructions")
    return AeadChoice("chacha20-poly1305", f"seal.aead = auto: {cpu.model} has no AES "
                      "instructions, and ChaCha20-Poly1305 is several times faster than "
                      "AES-256-GCM in software")
