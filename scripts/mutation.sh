#!/usr/bin/env bash
# `make mutation`: mutmut on every module of cbp/ that pyproject.toml's [tool.mutmut] does not
# exclude (the CLI glue and a few others, each with its reason there), with the tests that cover
# each mutated function, then the score per module. A tool, not a CI step: 2-4 hours on 2 quiet
# cores for everything (longer on a busy machine), so it can be stopped and continued:
#   scripts/mutation.sh [MODULE ...]   a fresh run; name modules to run fewer
#                                      (e.g. core.levels files.packing training.train)
#   scripts/mutation.sh --continue     go on with a stopped run: the results so far stand (from
#                                      mutants/, or from scripts/mutation-results.json when a
#                                      fresh checkout has no mutants/)
#   scripts/mutation.sh --survivors    run again only the survivors not judged equivalent, with
#                                      the tests as they are now (after adding tests)
# Results stay in mutants/ and are recorded in scripts/mutation-results.json when the run ends or
# is stopped (scripts/mutation_record.py; a fresh run's record replaces the previous one);
# `mutmut results` lists the survivors, `mutmut show NAME` shows one.
# A run continued or re-run maps test functions added since to what they call, but keeps its
# record of which existing tests cover which function; a fresh run rebuilds that record.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 CBP_COMPILE=0 HYPOTHESIS_PROFILE=mutation
names=()
if [ "${1:-}" = --continue ] || [ "${1:-}" = --survivors ]; then
  [ -d mutants ] || "$PYTHON" scripts/mutation_record.py restore
fi
case "${1:-}" in
  --continue) ;;
  --survivors) mapfile -t names < <("$PYTHON" scripts/mutation_score.py --survivors)
               if [ ${#names[@]} -eq 0 ]; then exec "$PYTHON" scripts/mutation_score.py; fi ;;
  *) rm -rf mutants
     for module in "$@"; do names+=("cbp.$module.*"); done ;;
esac
trap '"$PYTHON" scripts/mutation_record.py save' EXIT
"$PYTHON" scripts/mutmut_run.py run --max-children "${JOBS:-2}" "${names[@]}" | tail -n 3
"$PYTHON" scripts/mutation_score.py
