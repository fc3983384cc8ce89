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


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True,
                         text=True, check=False).stdout
    per = tally(out)
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
    Path("bench-out").mkdir(exist_ok=True)
    Path("bench-out/mutation.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
