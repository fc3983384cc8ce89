"""agent.crypto.aead_choice: ``seal.aead = "auto"`` seals with AES-256-GCM where the CPU
has AES instructions and with ChaCha20-Poly1305 where it has none (a Raspberry Pi 4), on
canned /proc/cpuinfo texts; a named AEAD is kept whatever the CPU."""

from __future__ import annotations

import pytest

from agent.cpu import identify, read_cpu
from agent.crypto.aead_choice import choose_aead
from tests.test_cpu import (
    A72_FEATURES,
    A76_FEATURES,
    HASWELL_FLAGS,
    arm_cpuinfo,
    x86_cpuinfo,
)

PI4 = identify(arm_cpuinfo(["0xd08"] * 4, A72_FEATURES, "Raspberry Pi 4 Model B Rev 1.4"),
               machine="aarch64")
PI5 = identify(arm_cpuinfo(["0xd0b"] * 4, A76_FEATURES, "Raspberry Pi 5 Model B Rev 1.0"),
               machine="aarch64")
HASWELL = identify(x86_cpuinfo("Intel(R) Xeon(R) CPU E5-2673 v3", HASWELL_FLAGS, cores=2,
                               threads_per_core=1), machine="x86_64")
NO_AES_NI = identify(x86_cpuinfo("QEMU Virtual CPU", HASWELL_FLAGS.replace(" aes ", " "),
                                 cores=2, threads_per_core=1), machine="x86_64")


def test_the_cpus_aes_instructions_are_read_from_cpuinfo() -> None:
    assert (PI4.aes, PI5.aes, HASWELL.aes, NO_AES_NI.aes) == (False, True, True, False)


@pytest.mark.parametrize(("cpu", "aead"), [(PI4, "chacha20-poly1305"), (PI5, "aes-256-gcm"),
                                           (HASWELL, "aes-256-gcm"),
                                           (NO_AES_NI, "chacha20-poly1305")])
def test_auto_picks_chacha20_only_without_aes_instructions(cpu: object, aead: str) -> None:
    choice = choose_aead("auto", cpu)  # type: ignore[arg-type]
    assert choice.aead == aead
    assert choice.reason.startswith("seal.aead = auto: ")
    assert ("has no AES instructions" in choice.reason) == (aead == "chacha20-poly1305")


def test_a_named_aead_is_kept_on_any_cpu() -> None:
    assert choose_aead("aes-256-gcm", PI4).aead == "aes-256-gcm"
    assert choose_aead("chacha20-poly1305", PI5).aead == "chacha20-poly1305"
    assert choose_aead("aes-256-gcm", PI4).reason == "set by seal.aead"


def test_this_machine_gets_an_answer() -> None:
    assert choose_aead("auto").aead == ("aes-256-gcm" if read_cpu().aes
                                        else "chacha20-poly1305")
