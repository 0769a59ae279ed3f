#!/usr/bin/env bash
# `make mutation`: mutmut on the core modules with their fast tests, one module at a time, then
# the score. A tool, not a CI step: about 5 minutes on 2 cores for all of them.
#   scripts/mutation.sh [MODULE ...]   (levels constraint layers lagrangian metrics packing export
#                                       oscillation baselines peers)
# Results stay in mutants/; `mutmut results` lists the survivors, `mutmut show NAME` shows one.
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT=${MUTMUT:-.venv/bin/mutmut}
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 CBP_COMPILE=0 HYPOTHESIS_PROFILE=mutation
# export.py: the file layout only, not the summary table or ONNX
EXPORT_LAYOUT="cbp.export.x_export__* cbp.export.x__packed_tensors* cbp.export.x__grouped*
  cbp.export.x__write* cbp.export.x__payload* cbp.export.x__read_header* cbp.export.x__valid_entry*
  cbp.export.x__read_layout* cbp.export.x__split* cbp.export.x__unpack_weight*
  cbp.export.x_read_packed* cbp.export.x__check_fits* cbp.export.x_load_packed*"
# a fresh mutants/ each time: mutmut reuses its record of which tests cover which function even
# after the tests changed, and then reports mutants the new tests kill as surviving
rm -rf mutants
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=(levels constraint layers lagrangian metrics packing export
                                     oscillation baselines peers)
for module in "${modules[@]}"; do
    if [ "$module" = export ]; then names=$EXPORT_LAYOUT; else names="cbp.$module.*"; fi
    echo "== $module"
    # shellcheck disable=SC2086
    "$MUTMUT" run --max-children "${JOBS:-2}" $names | tail -n 3
done
"$PYTHON" scripts/mutation_score.py
