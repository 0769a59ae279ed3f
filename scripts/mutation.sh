#!/usr/bin/env bash
# `make mutation`: mutmut on the core modules with their fast tests, one module at a time, then
# the score. A tool, not a CI step: about 5 minutes on 2 cores for all of them.
#   scripts/mutation.sh [MODULE ...]   (core.levels core.constraint core.layers core.lagrangian
#                                       core.metrics files.packing export core.oscillation
#                                       core.baselines training.peers)
# Results stay in mutants/; `mutmut results` lists the survivors, `mutmut show NAME` shows one.
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT=${MUTMUT:-.venv/bin/mutmut}
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 CBP_COMPILE=0 HYPOTHESIS_PROFILE=mutation
# files/export.py and files/export_read.py: the file layout only, not the refusal to replace a
# file that is not an export
EXPORT_LAYOUT="cbp.files.export.x_export__* cbp.files.export.x_packed_tensors__* cbp.files.export.x__grouped*
  cbp.files.export.x_write_file* cbp.files.export.x_payload* cbp.files.export.x_read_header*
  cbp.files.export_read.x__entry_grouping* cbp.files.export_read.x__valid_entry*
  cbp.files.export_read.x__read_layout* cbp.files.export_read.x__split* cbp.files.export_read.x__unpack_weight*
  cbp.files.export_read.x_read_packed* cbp.files.export_read.x__check_fits* cbp.files.export_read.x_load_packed*"
# a fresh mutants/ each time: mutmut reuses its record of which tests cover which function even
# after the tests changed, and then reports mutants the new tests kill as surviving
rm -rf mutants
modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=(core.levels core.constraint core.layers core.lagrangian
                                     core.metrics files.packing export core.oscillation
                                     core.baselines training.peers)
for module in "${modules[@]}"; do
    if [ "$module" = export ]; then names=$EXPORT_LAYOUT; else names="cbp.$module.*"; fi
    echo "== $module"
    # shellcheck disable=SC2086
    "$MUTMUT" run --max-children "${JOBS:-2}" $names | tail -n 3
done
"$PYTHON" scripts/mutation_score.py
