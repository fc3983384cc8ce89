"""The mutation score per module from ``mutmut results --all true`` (``make mutation``).

Prints a table (module, killed, survived, no tests, timeout, other, score) and writes it as
JSON to ``bench-out/mutation.json``. The score is killed / (killed + survived + no tests):
a mutant that no selected test reaches counts as surviving. The second table leaves out
the survivors that are equivalent (no test can tell them from the original): an SQL
keyword's case, and those ``tools/mutation_equivalent.py`` lists with the reason for each.
``--rerun`` prints the names of the mutants worth running again after tests were added
(every survivor that is not equivalent, and those stopped, timed out or not checked):
``mutmut run $(python -m tools.mutation_score --rerun)``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tools.mutation_equivalent import explain

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


_LOG_CALL = re.compile(r"\blog\.(debug|info|warning|error|exception)\(")


def _in_log_call(lines: list[str], i: int) -> bool:
    """Whether line ``i`` of a function lies inside a ``log.<level>(...)`` call."""
    for j in range(i, -1, -1):
        if _LOG_CALL.search(lines[j]):
            depth = 0
            for line in lines[j:i]:
                depth += line.count("(") - line.count(")")
            return j == i or depth > 0
    return False


def _quoted(sql: str) -> list[str]:
    """The SQL string literals of a line ('held'): their case matters, keywords' does not."""
    return re.findall(r"'[^']*'", sql)


def classify(orig: list[str], mutant: list[str]) -> tuple[str, str]:
    """(category, "original -> mutant") of one mutant's first changed line. Categories:
    ``sql-case`` (the case of SQL keywords and names, string literals unchanged: SQLite
    ignores it, equivalent), ``log`` (an
    argument of a log call), ``text`` (only the text of a message), ``logic``."""
    for i, (a, b) in enumerate(zip(orig, mutant, strict=False)):
        if a == b:
            continue
        diff = f"{a}  ->  {b}"
        if (a.lower() == b.lower() and _quoted(a) == _quoted(b) and re.search(
                r"(?i)\b(select|insert|update|delete|begin|commit|rollback|pragma|where|"
                r"values|order by|limit)\b", a)):
            return "sql-case", diff
        if _in_log_call(orig, i):
            return "log", diff
        if a.lower() == b.lower() or "XX" in b:
            return "text", diff
        return "logic", diff
    return "logic", "(signature)"


def _function_of(local: str) -> str:
    """``xǁStoreǁaccept__mutmut_3`` -> ``accept``; ``x_slice_info__mutmut_9`` -> ``slice_info``."""
    return re.split(r"ǁ|^x_", re.sub(r"__mutmut_\d+$", "", local))[-1]


def survivor_diffs(names: list[str]) -> dict[str, tuple[str, str]]:
    """What each surviving mutant changed (category, first changed line), read from the
    instrumented copies under mutants/."""
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
        category, diff = classify(orig, mutant)
        before, _, after = diff.partition("  ->  ")
        function = _function_of(local)
        if category != "sql-case" and explain(module, function, before, after) is not None:
            category = "equivalent"
        out[name] = (category, diff)
    return out


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(mutmut), "results", "--all", "true"], capture_output=True,
                         text=True, check=False).stdout
    if "--rerun" in sys.argv:
        statuses = {m["name"]: m["status"] for line in out.splitlines()
                    if (m := _LINE.match(line))}
        survivors = [n for n, st in statuses.items() if st == "survived"]
        diffs = survivor_diffs(survivors)
        again = [n for n, st in statuses.items() if st != "killed" and (
            st != "survived" or diffs[n][0] not in ("sql-case", "equivalent"))]
        print(" ".join(again))
        return 0
    per = tally(out)
    survivors = [m["name"] for line in out.splitlines() if (m := _LINE.match(line))
                 and m["status"] in ("survived", "no tests")]
    rows: list[dict[str, Any]] = []
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
    by_cat: dict[str, Counter[str]] = defaultdict(Counter)
    for name, (cat, _) in diffs.items():
        by_cat[module_of(name)][cat] += 1
    print(f"\n{'module':<28} {'sql-case':>8} {'equiv.':>6} {'log':>5} {'text':>5} "
          f"{'logic':>5} {'score w/o equivalents':>22}")
    for row in rows:
        c = by_cat[row["module"]]
        equivalent = c["sql-case"] + c["equivalent"]
        judged = row["killed"] + row["survived"] + row["no_tests"] - equivalent
        row["survivors_by_category"] = dict(c)
        row["score_without_equivalents"] = round(row["killed"] / judged, 4) if judged else 0.0
        print(f"{row['module']:<28} {c['sql-case']:>8} {c['equivalent']:>6} {c['log']:>5} "
              f"{c['text']:>5} {c['logic']:>5} {row['score_without_equivalents']:>22.1%}")
    Path("bench-out").mkdir(exist_ok=True)
    survivors_json = {n: {"category": c, "change": d} for n, (c, d) in diffs.items()}
    for n, entry in survivors_json.items():
        before, _, after = entry["change"].partition("  ->  ")
        function = _function_of(n[len(module_of(n)) + 1:])
        if entry["category"] == "equivalent":
            entry["why"] = explain(module_of(n), function, before, after) or ""
        elif entry["category"] == "sql-case":
            entry["why"] = "SQLite ignores the case of keywords and names"
    Path("bench-out/mutation.json").write_text(json.dumps(
        {"modules": rows, "survivors": survivors_json}, indent=2, ensure_ascii=False) + "\n")
    if "--survivors" in sys.argv:
        for name, (cat, diff) in diffs.items():
            if cat == "logic" or "--all-survivors" in sys.argv:
                print(f"{cat:<8} {name}: {diff}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
