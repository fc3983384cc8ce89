"""agent.cpu: CPU identification and the peak estimate, on canned /proc/cpuinfo texts of
the machines a site engineer meets (x86 servers with and without VNNI, Raspberry Pi 4 and
5, a big.LITTLE board)."""

from __future__ import annotations

import pytest

from agent.cpu import estimate_peak, identify, read_cpu
from agent.model.choice import cpu_why

HASWELL_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon "
    "pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 "
    "monitor ds_cpl vmx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic movbe "
    "popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault "
    "epb invpcid_single pti ssbd ibrs ibpb stibp tpr_shadow flexpriority ept vpid ept_ad "
    "fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rtm mpx rdseed adx smap clflushopt "
    "intel_pt xsaveopt xsavec xgetbv1 xsaves dtherm ida arat pln pts hwp md_clear flush_l1d"
)
CASCADE_LAKE_FLAGS = HASWELL_FLAGS + (
    " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni clwb pku ospke"
)


def x86_cpuinfo(model: str, flags: str, *, cores: int, threads_per_core: int,
                mhz: str | None = "3192.000", bogomips: str = "6384.00") -> str:
    """/proc/cpuinfo of a one-socket x86 machine, SMT siblings numbered after the cores
    (as Linux does)."""
    blocks = []
    for n in range(cores * threads_per_core):
        lines = [
            f"processor\t: {n}", "vendor_id\t: GenuineIntel", "cpu family\t: 6",
            f"model name\t: {model}", "physical id\t: 0",
            f"siblings\t: {cores * threads_per_core}", f"core id\t\t: {n % cores}",
            f"cpu cores\t: {cores}",
        ]
        if mhz is not None:
            lines.append(f"cpu MHz\t\t: {mhz}")
        lines += [f"flags\t\t: {flags}", f"bogomips\t: {bogomips}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def arm_cpuinfo(parts: list[str], features: str, model: str | None) -> str:
    blocks = [
        "\n".join([f"processor\t: {n}", "BogoMIPS\t: 108.00", f"Features\t: {features}",
                   "CPU implementer\t: 0x41", "CPU architecture: 8", "CPU variant\t: 0x4",
                   f"CPU part\t: {part}", "CPU revision\t: 1"])
        for n, part in enumerate(parts)
    ]
    if model:  # Raspberry Pi kernels end the file with the board
        blocks.append(f"Revision\t: d04170\nSerial\t\t: 1234567890abcdef\nModel\t\t: {model}")
    return "\n\n".join(blocks) + "\n"


A76_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                "asimdrdm lrcpc dcpop asimddp")
A72_FEATURES = "fp asimd evtstrm crc32 cpuid"
A55_FEATURES = A76_FEATURES  # RK3588: both clusters report the same features


def test_x86_avx2_without_vnni_counts_physical_cores_at_the_max_clock() -> None:
    text = x86_cpuinfo("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", HASWELL_FLAGS, cores=6,
                       threads_per_core=2)
    cpu = identify(text, max_khz=dict.fromkeys(range(12), 4600000), machine="x86_64")
    assert cpu.model.startswith("Intel(R) Core(TM) i7-8700")
    assert (cpu.logical_cpus, cpu.cores) == (12, 6)  # SMT siblings share the FMA units
    assert cpu.isa == ("AVX2", "FMA") and cpu.int8_dot is None
    assert cpu.clock_source == "cpufreq cpuinfo_max_freq"
    peak = estimate_peak(cpu)
    assert peak.fp32_gmacs == pytest.approx(6 * 4.6 * 16)  # 2 FMA x 8 lanes
    assert peak.int8_gmacs == pytest.approx(2 * 6 * 4.6 * 16)  # no VNNI: 2x fp32
    assert "6 cores x 4.60 GHz x 16 (fp32) / 32 (int8)" in peak.formula
    assert any("without VNNI" in a for a in cpu.assumptions)
    assert any("12 logical" in a for a in cpu.assumptions)


def test_x86_avx512_vnni_without_cpufreq_uses_cpu_mhz() -> None:
    text = x86_cpuinfo("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", CASCADE_LAKE_FLAGS,
                       cores=2, threads_per_core=1, mhz="2500.000")
    cpu = identify(text, max_khz={}, machine="x86_64")
    assert cpu.cores == 2 and cpu.int8_dot == "AVX-512 VNNI"
    assert "AVX-512" in cpu.isa and "AVX-512 VNNI" in cpu.isa
    assert "cpu MHz" in cpu.clock_source
    peak = estimate_peak(cpu)
    assert peak.fp32_gmacs == pytest.approx(2 * 2.5 * 32)
    assert peak.int8_gmacs == pytest.approx(2 * 2.5 * 128)  # VNNI: 4 products per lane


def test_x86_falls_back_to_bogomips_and_honours_the_affinity() -> None:
    text = x86_cpuinfo("Some x86", HASWELL_FLAGS, cores=4, threads_per_core=1, mhz=None,
                       bogomips="4000.00")
    cpu = identify(text, allowed={0, 1}, machine="x86_64")
    assert cpu.cores == 2 and cpu.logical_cpus == 2
    assert "BogoMIPS" in cpu.clock_source
    assert estimate_peak(cpu).fp32_gmacs == pytest.approx(2 * 2.0 * 16)


def test_raspberry_pi_5_cortex_a76_has_dot_product() -> None:
    text = arm_cpuinfo(["0xd0b"] * 4, A76_FEATURES, "Raspberry Pi 5 Model B Rev 1.0")
    cpu = identify(text, max_khz=dict.fromkeys(range(4), 2400000), machine="aarch64")
    assert cpu.model == "Raspberry Pi 5 Model B Rev 1.0 (4 x Cortex-A76)"
    assert cpu.cores == 4 and cpu.int8_dot == "SDOT/UDOT (asimddp)"
    assert "NEON" in cpu.isa and "dot product (asimddp)" in cpu.isa
    assert cpu.clock_source == "cpufreq cpuinfo_max_freq"  # not the BogoMIPS of the timer
    peak = estimate_peak(cpu)
    assert peak.fp32_gmacs == pytest.approx(4 * 2.4 * 8)  # 2 x 128-bit FMA pipes
    assert peak.int8_gmacs == pytest.approx(4 * 4 * 2.4 * 8)


def test_raspberry_pi_4_cortex_a72_without_dot_product_or_cpufreq() -> None:
    text = arm_cpuinfo(["0xd08"] * 4, A72_FEATURES, "Raspberry Pi 4 Model B Rev 1.4")
    cpu = identify(text, max_khz={}, machine="aarch64")  # in a container: no cpufreq
    assert cpu.int8_dot is None and "NEON" in cpu.isa
    assert "typical max clock of a Cortex-A72 (Raspberry Pi 4)" in cpu.clock_source
    peak = estimate_peak(cpu)
    assert peak.fp32_gmacs == pytest.approx(4 * 1.8 * 8)
    assert peak.int8_gmacs == pytest.approx(2 * 4 * 1.8 * 8)  # widening MACs only
    assert any("without dot product" in a for a in cpu.assumptions)


def test_big_little_sums_its_clusters() -> None:
    text = arm_cpuinfo(["0xd05"] * 4 + ["0xd0b"] * 4, A55_FEATURES, None)
    khz = dict.fromkeys(range(4), 1800000) | dict.fromkeys(range(4, 8), 2256000)
    cpu = identify(text, max_khz=khz, machine="aarch64")
    assert cpu.model == "4 x Cortex-A55 + 4 x Cortex-A76"
    peak = estimate_peak(cpu)
    assert peak.fp32_gmacs == pytest.approx(4 * 1.8 * 4 + 4 * 2.256 * 8, abs=0.1)
    assert peak.int8_gmacs == pytest.approx(4 * (4 * 1.8 * 4 + 4 * 2.256 * 8), abs=0.1)


def test_unknown_arm_core_without_a_clock_has_no_peak() -> None:
    text = arm_cpuinfo(["0xfff"] * 2, "fp asimd", None)
    cpu = identify(text, machine="aarch64")
    peak = estimate_peak(cpu)
    assert peak.fp32_gmacs is None and peak.int8_gmacs is None
    assert "unknown" in cpu.clock_source


def test_this_machine_is_identified() -> None:
    cpu = read_cpu()
    assert cpu.cores >= 1 and cpu.logical_cpus >= cpu.cores and cpu.groups
    assert cpu.model


def test_a_zero_cpu_mhz_is_not_a_clock() -> None:
    text = ("processor\t: 0\nmodel name\t: Some VM CPU\nflags\t\t: fpu avx2 fma\n"
            "cpu MHz\t\t: 0.000\nbogomips\t: 4000.00\n")
    cpu = identify(text, machine="x86_64")
    assert cpu.groups[0].ghz == 2.0 and "BogoMIPS" in cpu.clock_source
    cpu = identify(text.replace("bogomips\t: 4000.00\n", ""), machine="x86_64")
    assert cpu.groups[0].ghz is None and estimate_peak(cpu).fp32_gmacs is None


def _with_family(text: str, vendor: str, family: int, model: int) -> str:
    return (text.replace("vendor_id\t: GenuineIntel", f"vendor_id\t: {vendor}")
            .replace("cpu family\t: 6", f"cpu family\t: {family}\nmodel\t\t: {model}"))


@pytest.mark.parametrize(("vendor", "family", "model", "one_pipe"), [
    ("AuthenticAMD", 0x17, 0x31, True),  # Zen 2 (EPYC Rome)
    ("AuthenticAMD", 0x19, 0x01, False),  # Zen 3 (EPYC Milan)
    ("GenuineIntel", 6, 0x3F, True),  # Haswell-EP
    ("GenuineIntel", 6, 0x9E, False),  # Coffee Lake: two multipliers, as Skylake
])
def test_avx2_cores_with_one_vector_multiplier_peak_int8_at_the_fp32_rate(
        vendor: str, family: int, model: int, one_pipe: bool) -> None:
    text = _with_family(x86_cpuinfo("EPYC or Xeon", HASWELL_FLAGS, cores=2,
                                    threads_per_core=1), vendor, family, model)
    cpu = identify(text, max_khz=dict.fromkeys(range(2), 2000000), machine="x86_64")
    group = cpu.groups[0]
    assert group.fp32_macs == 16
    assert group.int8_macs == (16 if one_pipe else 32)
    assert any("one vector integer multiplier" in a for a in cpu.assumptions) == one_pipe
    assert ("one vector integer multiplier" in cpu_why(cpu)) == one_pipe


def test_avx512_vnni_is_not_downgraded_by_family() -> None:
    text = _with_family(x86_cpuinfo("Xeon", CASCADE_LAKE_FLAGS, cores=2, threads_per_core=1),
                        "GenuineIntel", 6, 0x3F)
    assert identify(text, machine="x86_64").groups[0].int8_macs == 128
