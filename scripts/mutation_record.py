"""Keep mutmut's results in the repository, so a mutation run outlives its ``mutants/`` folder.

A whole run takes longer than one working session (scripts/mutation.sh), and ``mutants/`` is a
scratch folder that a fresh checkout does not have. ``save`` writes every decided mutant's exit
code, with the hash mutmut keeps of its function, to ``scripts/mutation-results.json``;
``restore`` writes them back as mutmut's ``.meta`` files into an empty ``mutants/``. mutmut then
regenerates the mutants and keeps a result only where the function's hash is unchanged, so an
edited function is run again and the rest stand. A kill recorded under older tests stands (tests
are added, not weakened); survivors are run again with ``scripts/mutation.sh --survivors``.

    python scripts/mutation_record.py save | restore
"""

from __future__ import annotations

import glob
import json
import os
import sys

RECORD = os.path.join(os.path.dirname(__file__), "mutation-results.json")


def save(root: str = "mutants", path: str = RECORD) -> int:
    """Record every decided mutant under ``root``; returns how many. Written whole or not at all,
    and not at all when nothing is decided (a run that stopped before its first mutant keeps the
    record it started from)."""
    record, count = {}, 0
    for meta_path in sorted(glob.glob(os.path.join(root, "cbp", "**", "*.py.meta"), recursive=True)):
        meta = json.load(open(meta_path, encoding="utf-8"))
        functions = {}
        for key, code in meta["exit_code_by_key"].items():
            function, _, number = key.rpartition(".")[2].rpartition("__mutmut_")
            if code is None or function not in meta["hash_by_function_name"]:
                continue
            entry = functions.setdefault(function, {"hash": meta["hash_by_function_name"][function],
                                                    "codes": {}})
            entry["codes"][number] = code
            count += 1
        if functions:
            record[os.path.relpath(meta_path, root).removesuffix(".meta")] = functions
    if not count:
        return 0
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(record, out, indent=0, sort_keys=True, ensure_ascii=False)
        out.write("\n")
    os.replace(temporary, path)
    return count


def restore(root: str = "mutants", path: str = RECORD) -> int:
    """Write the recorded results as mutmut ``.meta`` files; returns how many mutants."""
    if os.path.exists(root):
        raise SystemExit(f"error: {root}/ exists; restore only fills an empty one")
    record = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {}
    count = 0
    for source, functions in record.items():
        module = source.removesuffix(".py").replace("/", ".")
        codes = {f"{module}.{function}__mutmut_{number}": code
                 for function, entry in functions.items() for number, code in entry["codes"].items()}
        meta = {"exit_code_by_key": codes,
                "hash_by_function_name": {function: entry["hash"] for function, entry in functions.items()},
                "type_check_error_by_key": {}, "durations_by_key": {}, "estimated_durations_by_key": {}}
        os.makedirs(os.path.dirname(os.path.join(root, source)), exist_ok=True)
        with open(os.path.join(root, source + ".meta"), "w", encoding="utf-8") as out:
            json.dump(meta, out)
        count += len(codes)
    return count


if __name__ == "__main__":
    actions = {"save": save, "restore": restore}
    if sys.argv[1:] not in ([name] for name in actions):
        raise SystemExit("usage: mutation_record.py save | restore")
    action = sys.argv[1]
    print(f"{action}: {actions[action]()} mutant results ({RECORD})")
