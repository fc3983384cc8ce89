"""The matrix's verdict, table and JSON from the cells' results (pure: no emulation here)."""

from __future__ import annotations

from typing import Any

# What each emulated CPU must show from inside, or its column proves nothing.
EXPECT: dict[str, dict[str, bool]] = {
    "haswell": {"avx2": True, "fma3": True, "avx512f": False, "avx512vnni": False},
    "cortex-a72": {"dotprod": False},
    "cortex-a76": {"dotprod": True},
}


def cpu_problems(name: str, cell: dict[str, Any]) -> list[str]:
    """Where the CPU seen inside the cell is not the one the column stands for."""
    seen = cell.get("cpu", {})
    return [f"{key} is {seen.get(key)!r}, expected {want!r}"
            for key, want in EXPECT.get(name, {}).items() if seen.get(key) is not want]


def judge(name: str, cell: dict[str, Any]) -> list[str]:
    """Every reason this column fails (empty: it passes)."""
    why = [f"{name}: the CPU is not what it should be: {p}" for p in cpu_problems(name, cell)]
    if cell.get("error"):
        why.append(f"{name}: {cell['error']}")
    guard = cell.get("guard")
    if not guard:
        why.append(f"{name}: no guard results")
    for row in guard or ():
        if not row["ok"]:
            why.append(f"{name}: {row['bundle']} on {row['runtime']}: {row['reason']}")
    sealing = cell.get("seal")
    if sealing is None and guard:
        why.append(f"{name}: no sealing results")
    for row in (sealing or {}).get("rows", ()):
        if not row["ok"]:
            why.append(f"{name}: sealing with {row['suite']}"
                       f"{' v' + str(row['version']) if 'version' in row else ''}: "
                       f"{row['reason']}")
    tests = cell.get("tests")
    if tests is not None and not tests["ok"]:
        failed = [k for k, v in tests["not_passed"].items() if v["outcome"] == "failed"]
        why.append(f"{name}: tests exit {tests['exit_code']}, failed: "
                   f"{', '.join(failed) or 'none recorded'}")
    return why


def cpu_label(name: str, cell: dict[str, Any]) -> str:
    seen = cell.get("cpu", {})
    if "dotprod" in seen:
        return f"asimddp {'on' if seen['dotprod'] else 'off'}"
    if not seen:
        return "?"
    if seen.get("avx512vnni"):
        return "AVX-512 VNNI"
    return "AVX-512, no VNNI" if seen.get("avx512f") else ("AVX2" if seen.get("avx2") else "SSE")


def _cell_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    verdict = "PASS" if row["ok"] else "FAIL"
    if row.get("worst_psnr_db") is None:
        return f"{verdict} (error)"
    return f"{_db(row['worst_psnr_db'])}/{row['floor_db']:g} {verdict}"


def _db(value: Any) -> str:
    """A PSNR for people: two decimals ("inf" stays "inf")."""
    return f"{value:.2f}" if isinstance(value, (int, float)) else str(value)


def _tests_text(cell: dict[str, Any]) -> str:
    tests = cell.get("tests")
    if tests is None:
        return "not run" if cell.get("guard") else "-"
    c = tests["counts"]
    text = f"{c.get('passed', 0)}p {c.get('failed', 0)}f {c.get('skipped', 0)}s"
    return f"{text} {'PASS' if tests['ok'] else 'FAIL'}"


def _seal_text(cell: dict[str, Any]) -> str:
    sealing = cell.get("seal")
    if sealing is None:
        return "-"
    good = sum(r["ok"] for r in sealing["rows"])
    auto = {"aes-256-gcm": "AES", "chacha20-poly1305": "ChaCha20"}.get(sealing["auto"], "?")
    return f"{good}/{len(sealing['rows'])} auto {auto} {'PASS' if sealing['ok'] else 'FAIL'}"


def table(cells: dict[str, dict[str, Any]]) -> str:
    """bundle x runtime rows, one column per CPU: worst golden PSNR / floor (dB), verdict."""
    names = list(cells)
    keys: list[tuple[str, str]] = []
    for cell in cells.values():
        for row in cell.get("guard") or ():
            if (row["bundle"], row["runtime"]) not in keys:
                keys.append((row["bundle"], row["runtime"]))
    width = 20
    head = f"{'bundle':<18} {'runtime':<12}" + "".join(f" {n:<{width}}" for n in names)
    sub = f"{'':<18} {'':<12}" + "".join(f" {cpu_label(n, cells[n]):<{width}}" for n in names)
    lines = ["int8 guard: worst golden PSNR / floor (dB) per CPU", head, sub]
    for bundle, runtime in keys:
        texts = []
        for n in names:
            found = [r for r in cells[n].get("guard") or ()
                     if (r["bundle"], r["runtime"]) == (bundle, runtime)]
            texts.append(_cell_text(found[0] if found else None))
        lines.append(f"{bundle:<18} {runtime:<12}" + "".join(f" {t:<{width}}" for t in texts))
    lines.append(f"{'tests (quantizing)':<18} {'':<12}"
                 + "".join(f" {_tests_text(cells[n]):<{width}}" for n in names))
    lines.append(f"{'sealing (suites)':<18} {'':<12}"
                 + "".join(f" {_seal_text(cells[n]):<{width}}" for n in names))
    return "\n".join(lines)
