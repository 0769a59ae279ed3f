"""The mutation score per module from mutmut's results in mutants/ (see scripts/mutation.sh).

score = killed / (killed + survived + no tests); a timeout counts as killed, a mutant never run
is left out. Survivors are listed by name (``mutmut show NAME`` prints the change).
"""

from __future__ import annotations

import glob
import json
import os
import sys

KILLED, SURVIVED = {1, 3, 24, -24, 36, 152, 255}, {0, 5, 33}


def main(root: str = "mutants") -> None:
    total_killed = total_counted = 0
    survivors = []
    print(f"{'module':<22}{'killed':>8}{'counted':>9}{'score':>9}")
    for meta in sorted(glob.glob(os.path.join(root, "cbp", "**", "*.py.meta"), recursive=True)):
        codes = json.load(open(meta))["exit_code_by_key"]
        killed = sum(code in KILLED for code in codes.values())
        lived = [name for name, code in codes.items() if code in SURVIVED]
        if killed + len(lived) == 0:
            continue
        survivors += lived
        total_killed, total_counted = total_killed + killed, total_counted + killed + len(lived)
        name = os.path.relpath(meta, os.path.join(root, "cbp")).removesuffix(".py.meta")
        print(f"{name:<22}{killed:>8}{killed + len(lived):>9}{killed / (killed + len(lived)):>9.1%}")
    if total_counted:
        print(f"{'all':<22}{total_killed:>8}{total_counted:>9}{total_killed / total_counted:>9.1%}")
    print(f"\n{len(survivors)} survivors:", *sorted(survivors), sep="\n  ")


if __name__ == "__main__":
    main(*sys.argv[1:])
