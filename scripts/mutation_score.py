"""The mutation score per module from mutmut's results in mutants/ (see scripts/mutation.sh).

score = killed / (killed + survived + no tests); a timeout counts as killed, a mutant never run
is left out. ``non-eq`` is the same score over the mutants not judged equivalent in
``scripts/mutation-equivalents.txt`` (one ``mutant_name: reason`` per line: no supported input
tells the mutant apart, or it runs where mutmut cannot switch it on). Survivors not judged
equivalent are listed by name (``mutmut show NAME`` prints the change); ``--survivors`` prints
only their names, one a line (``scripts/mutation.sh --survivors`` runs them again).
"""

from __future__ import annotations

import glob
import json
import os
import sys

KILLED, SURVIVED = {1, 3, 24, -24, 36, 152, 255}, {0, 5, 33}
EQUIVALENTS = os.path.join(os.path.dirname(__file__), "mutation-equivalents.txt")


def judged_equivalent(path: str = EQUIVALENTS) -> set[str]:
    if not os.path.exists(path):
        return set()
    lines = (line.split(":", 1)[0].strip() for line in open(path, encoding="utf-8"))
    return {name for name in lines if name and not name.startswith("#")}


def _results(root: str) -> list[tuple[str, dict]]:
    """``(module, {mutant_name: exit code})`` for every mutated module, in path order."""
    metas = sorted(glob.glob(os.path.join(root, "cbp", "**", "*.py.meta"), recursive=True))
    return [(os.path.relpath(meta, os.path.join(root, "cbp")).removesuffix(".py.meta"),
             json.load(open(meta))["exit_code_by_key"]) for meta in metas]


def survivors(root: str = "mutants") -> list[str]:
    """The mutants that survived (or had no test) and are not judged equivalent, by name."""
    equivalent = judged_equivalent()
    return sorted(name for _, codes in _results(root) for name, code in codes.items()
                  if code in SURVIVED and name not in equivalent)


def main(root: str = "mutants") -> None:
    equivalent = judged_equivalent()
    totals = [0, 0, 0]   # killed, counted, equivalent
    print(f"{'module':<24}{'killed':>8}{'counted':>9}{'score':>8}{'equiv':>7}{'non-eq':>8}")
    for module, codes in _results(root):
        killed = sum(code in KILLED for code in codes.values())
        lived = [name for name, code in codes.items() if code in SURVIVED]
        if killed + len(lived) == 0:
            continue
        row = (killed, killed + len(lived), sum(name in equivalent for name in lived))
        totals = [a + b for a, b in zip(totals, row)]
        print(_line(module, *row))
    if totals[1]:
        print(_line("all", *totals))
    left = survivors(root)
    print(f"\n{len(left)} survivors not judged equivalent:", *left, sep="\n  ")


def _line(name: str, killed: int, counted: int, same: int) -> str:
    return (f"{name:<24}{killed:>8}{counted:>9}{killed / counted:>8.1%}{same:>7}"
            f"{killed / max(counted - same, 1):>8.1%}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--survivors"]:
        print(*survivors(*sys.argv[2:]), sep="\n")
    else:
        main(*sys.argv[1:])
