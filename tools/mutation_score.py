"""The mutation score per module from ``mutmut results --all true`` (``make mutation``).

Prints a table (module, killed, survived, no tests, timeout, other, score) and writes it as
JSON to ``bench-out/mutation.json``. The score is killed / (killed + survived + no tests):
a mutant that no selected test reaches counts as surviving.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

_LINE = re.compile(r"^\s*(?P<name>[\w.ǁ]+__mutmut_\d+):\s*(?P<status>.+?)\s*$")


def module_of(name: str) -> str:
    """``agent.daemon.store.xǁStoreǁaccept__mutmut_3`` -> ``agent.daemon.store``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith(("x_", "xǁ")):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def tally(text: str) -> dict[str, Counter[str]]:
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            per[module_of(m["name"])][m["status"]] += 1
    return per


def _functions(source: str) -> dict[str, list[str]]:
    """Every top-level or method body in a mutmut-instrumented file, by its mangled name."""
    bodies: dict[str, list[str]] = {}
    current: str | None = None
    for line in source.splitlines():
        m = re.match(r"^\s*def (x[_ǁ][\wǁ]*__mutmut_(?:orig|\d+))\(", line)
        if m:
            current = m[1]
            bodies[current] = []
            continue
        if current is not None:
            bodies[current].append(line.strip())
    return bodies


def survivor_diffs(names: list[str]) -> dict[str, str]:
    """What each surviving mutant changed (the first differing line, original -> mutant),
    read from the instrumented copies under mutants/."""
    cache: dict[str, dict[str, list[str]]] = {}
    out = {}
    for name in names:
        module = module_of(name)
        if module not in cache:
            path = Path("mutants") / (module.replace(".", "/") + ".py")
            cache[module] = _functions(path.read_text()) if path.exists() else {}
        local = name[len(module) + 1:]
        orig = cache[module].get(re.sub(r"__mutmut_\d+$", "__mutmut_orig", local), [])
        mutant = cache[module].get(local, [])
        changed = [(a, b) for a, b in zip(orig, mutant, strict=False) if a != b]
        out[name] = f"{changed[0][0]}  ->  {changed[0][1]}" if changed else "(signature)"
    return out


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True,
                         text=True, check=False).stdout
    per = tally(out)
    survivors = [m["name"] for line in out.splitlines() if (m := _LINE.match(line))
                 and m["status"] in ("survived", "no tests")]
    rows = []
    print(f"{'module':<28} {'killed':>6} {'survived':>8} {'no tests':>8} {'timeout':>7} "
          f"{'other':>5} {'score':>6}")
    for module in sorted(per):
        c = per[module]
        killed = c["killed"] + c["timeout"]  # a mutant that hangs the tests is caught
        survived, untested = c["survived"], c["no tests"]
        other = sum(c.values()) - killed - survived - untested
        judged = killed + survived + untested
        score = killed / judged if judged else 0.0
        rows.append({"module": module, "killed": killed, "survived": survived,
                     "no_tests": untested, "timeout": c["timeout"], "other": other,
                     "score": round(score, 4)})
        print(f"{module:<28} {killed:>6} {survived:>8} {untested:>8} {c['timeout']:>7} "
              f"{other:>5} {score:>6.1%}")
    diffs = survivor_diffs(survivors)
    Path("bench-out").mkdir(exist_ok=True)
    Path("bench-out/mutation.json").write_text(json.dumps(
        {"modules": rows, "survivors": diffs}, indent=2, ensure_ascii=False) + "\n")
    if "--survivors" in sys.argv:
        for name, diff in diffs.items():
            print(f"{name}: {diff}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
