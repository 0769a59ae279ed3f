#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (see ../shared/GPU.md): versions, the test suite,
# step time of ResNet-18 224x224 batch 256 on CUDA, torchrun on a paper config with a synthetic
# ImageFolder (resume, evaluate), the headline comparison with 10 paired seeds on the GPU, and
# (STEPS=loop, loopparts, compile) the whole loop against a plain one, what each of cbp's extras
# costs of it, and the penalty compile's share.
#
#   bash scripts/gpu_check.sh [OUT_DIR]   reports in OUT_DIR (default runs/gpu), also printed;
#                                         data, runs and caches in WORK (default: a temp folder)
#
# Each step has its own time limit and a failure does not stop the next one. STEPS picks steps
# (default "timing torchrun compare"; also "loop", "loopparts", "compile"; the tests always run, stopped at
# DEADLINE_S seconds after the start when given and compare is not run); COMPARE_ARGS adds
# arguments to compare.py (e.g. "--methods ste,cbp_1e-2"); cells already in gpu_carry/bench/results
# are reused; LOOP_ARGS adds cbp flags to loop_time.py's runs (e.g. "--checkpoint-every 3600").
# Without CUDA the GPU steps are skipped, so it can be dry-run on a laptop. A machine
# without Debian's Fashion-MNIST or without hypothesis gets them from gpu_carry/ (made by
# `bash scripts/gpu_check.sh --prepare`): the four .gz files, hypothesis (pure Python), Shakespeare's
# texts and the CPU-pretrained benchmark checkpoint (when this machine has one), so both machines'
# comparisons start from the very same weights.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    set -e
    mkdir -p gpu_carry/fashion-mnist gpu_carry/bench
    cp /usr/share/datasets/fashion-mnist/*.gz gpu_carry/fashion-mnist/
    # pure-Python wheels (newer hypothesis wheels hold code compiled for this Python alone)
    .venv/bin/pip install -q --target gpu_carry/site --only-binary=:all: --platform any \
        --python-version 3.10 --implementation py hypothesis tomli
    if [ -f runs/bench/fp-mobilenet-n10000-e3-b128.safetensors ]; then
        cp runs/bench/fp-mobilenet-n10000-e3-b128.safetensors gpu_carry/bench/
    fi
    cp -r "$HOME/.cache/cbp/shakespeare" gpu_carry/ 2>/dev/null || true   # for the GPT's loop
    exit 0
fi

OUT_DIR=${1:-runs/gpu}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT_DIR" "$WORK"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d gpu_carry/site ] && export PYTHONPATH=$PYTHONPATH:$PWD/gpu_carry/site
[ -d gpu_carry/fashion-mnist ] && [ ! -d /usr/share/datasets/fashion-mnist ] \
    && export CBP_FASHION_MNIST_DIR=$PWD/gpu_carry/fashion-mnist
if [ -d gpu_carry/shakespeare ] && [ ! -d "$HOME/.cache/cbp/shakespeare" ]; then
    mkdir -p "$HOME/.cache/cbp" && cp -r gpu_carry/shakespeare "$HOME/.cache/cbp/"
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, report rc and wall time
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    echo "=== $name (limit ${limit} s) ==="
    timeout "$limit" "$@"
    echo "=== $name: rc=$? after $(( $(date +%s) - start )) s ==="
}

echo "=== versions ==="
$PY -c "import sys, torch, torchvision; print('python', sys.version.split()[0], '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
nproc

STEPS=${STEPS:-timing torchrun compare}
COMPARE_SECONDS=${COMPARE_SECONDS:-200}
wants() { [[ " $STEPS " == *" $1 "* ]]; }

if [ "$HAS_CUDA" = 1 ]; then
  if wants timing; then
    # 1. what CBP costs per step on the GPU, alone on the machine (timings first)
    step "step time, ResNet-18 224x224 batch 256" 300 \
        $PY benchmarks/step_time.py --device cuda --models resnet18 --image-size 224 --batch 256
  fi

  if wants loop; then
    # cbp's whole training loop against a plain PyTorch loop (issue 27), alternated, median of 3
    step "loop time, cbp / plain loop on CUDA" 150 \
        $PY benchmarks/loop_time.py --steps 200 --epochs 2 --repeat 3 --device cuda ${LOOP_ARGS:-}
  fi

  if wants loopparts; then
    # what each of cbp's extras costs of the loop on the GPU: cbp with it made a no-op (issue 27)
    step "loop time on CUDA, cbp without its parts" 260 \
        $PY benchmarks/loop_time.py --steps 200 --epochs 2 --repeat 3 --case resnet20-pretrain \
            --case gpt-pretrain --case resnet20-quantize --without checkpoint --without bars+poll \
            --without checkpoint+bars+poll+histogram+tracker+report --device cuda ${LOOP_ARGS:-}
    step "profile of cbp's loop on CUDA, ResNet-20 pretrain" 60 \
        $PY benchmarks/loop_time.py --profile resnet20-pretrain --steps 200 --epochs 2 --device cuda
  fi

  if wants compile; then
    # what the penalty pass's compile costs of a short run of a 20M-parameter transformer (issue 27)
    step "penalty compile share, 20M transformer, 300 steps" 150 \
        $PY benchmarks/compile_share.py --model gpt20m --steps 300 --device cuda --policies auto on eager
  fi

  if wants torchrun; then
    # 2. torchrun on a paper config: ~200 steps on a synthetic ImageFolder, resume, evaluate
    data=$WORK/imagefolder
    $PY - "$data" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
root, rng = sys.argv[1], np.random.default_rng(0)
for split, count in (("train", 320), ("val", 32)):
    for c in range(4):  # four classes, each a different mean colour plus noise
        os.makedirs(f"{root}/{split}/class{c}", exist_ok=True)
        for i in range(count):
            pixels = rng.normal(60 * c + 40, 40, (256, 256, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(f"{root}/{split}/class{c}/{i}.jpg", quality=90)
EOF
    $PY -c "import sys, torch, torchvision; from safetensors.torch import save_file; torch.manual_seed(0); save_file(torchvision.models.resnet18(num_classes=4).state_dict(), sys.argv[1])" "$WORK/resnet18-random.safetensors"
    run=$WORK/resnet18-binary
    common=(--config paper/resnet18-binary --data-dir "$data" --weights "$WORK/resnet18-random.safetensors"
            --batch-size 64 --workers 8 --out "$run" --quiet)
    step "torchrun, paper/resnet18-binary, 200 steps" 100 \
        $PY -m torch.distributed.run --nproc_per_node 1 -m cbp quantize "${common[@]}" --epochs 10 --overwrite
    step "torchrun, resume for one more epoch" 50 \
        $PY -m torch.distributed.run --nproc_per_node 1 -m cbp quantize "${common[@]}" --epochs 11 --resume
    $PY -c "import json, sys; rows=[json.loads(l) for l in open(sys.argv[1])]; print('epochs logged', [r['epoch'] for r in rows]); print('last row', rows[-1])" "$run/log.jsonl"
    step "cbp evaluate" 40 $PY -m cbp evaluate "$run/checkpoint.pt" --data-dir "$data" --recalibrate-bn 4
  fi

    # 3. the headline comparison with 10 paired seeds (issue 12), workers sharing the GPU, in
    # parallel with the test suite (neither is a timing)
    cache=$WORK/bench
    mkdir -p "$cache" && cp -r gpu_carry/bench/. "$cache/" 2>/dev/null
    # DEADLINE_S (seconds since the script began): the tests stop in time for the rest to report
    tests_limit=$((COMPARE_SECONDS - 10))
    if [ -n "${DEADLINE_S:-}" ] && ! wants compare; then
        tests_limit=$((DEADLINE_S - SECONDS - 20))
    fi
    echo "=== pytest on the machine (limit ${tests_limit} s, log in $OUT_DIR/pytest.log) ==="
    (timeout "$tests_limit" $PY -m pytest -q -p no:cacheprovider > "$OUT_DIR/pytest.log" 2>&1; echo "pytest rc=$?" >> "$OUT_DIR/pytest.log") &
    if wants compare; then
        # shellcheck disable=SC2086
        step "compare.py, 10 seeds on the GPU" "$COMPARE_SECONDS" \
            $PY benchmarks/compare.py --device cuda --seeds 10 --jobs 12 --cache "$cache" --reuse \
                ${COMPARE_ARGS:-}
        # the table of every cell that finished (also when cut short or run for some methods only)
        $PY benchmarks/compare.py --device cuda --seeds 10 --cache "$cache" --cached \
            --out "$OUT_DIR/compare-gpu.md" --json "$OUT_DIR/compare-gpu.json"
    fi
    wait
    tail -n 15 "$OUT_DIR/pytest.log"
else
    echo "no CUDA: the GPU steps are skipped; the tests run on the CPU"
    step "pytest" 900 $PY -m pytest -q -x -p no:cacheprovider
fi
