#!/usr/bin/env bash
# `make mutation`: mutmut on every module of cbp/ that pyproject.toml's [tool.mutmut] does not
# exclude (the CLI glue and a few others, each with its reason there), with the tests that cover
# each mutated function, then the score per module. A tool, not a CI step: 2-4 hours on 2 cores
# for everything; name modules to run fewer:
#   scripts/mutation.sh [MODULE ...]     e.g. core.levels files.packing training.train
# Results stay in mutants/; `mutmut results` lists the survivors, `mutmut show NAME` shows one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 CBP_COMPILE=0 HYPOTHESIS_PROFILE=mutation
# a fresh mutants/ each time: mutmut reuses its record of which tests cover which function even
# after the tests changed, and then reports mutants the new tests kill as surviving
rm -rf mutants
names=()
for module in "$@"; do names+=("cbp.$module.*"); done
"$PYTHON" scripts/mutmut_run.py run --max-children "${JOBS:-2}" "${names[@]}" | tail -n 3
"$PYTHON" scripts/mutation_score.py
