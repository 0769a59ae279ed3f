#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (see ../shared/GPU.md): versions, the test suite,
# step time of ResNet-18 224x224 batch 256 on CUDA, torchrun on a paper config with a synthetic
# ImageFolder (resume, evaluate), and the headline comparison with 10 paired seeds on the GPU.
#
#   bash scripts/gpu_check.sh [OUT_DIR]   reports in OUT_DIR (default runs/gpu), also printed;
#                                         data, runs and caches in WORK (default: a temp folder)
#
# Each step has its own time limit and a failure does not stop the next one. STEPS picks steps
# (default "timing torchrun compare"; the tests always run); COMPARE_ARGS adds arguments to
# compare.py (e.g. "--methods ste,cbp_1e-2"); cells already in gpu_carry/bench/results are reused. Without CUDA the
# GPU steps are skipped, so it can be dry-run on a laptop. A machine without Debian's Fashion-MNIST
# or without hypothesis gets them from gpu_carry/ (made by `bash scripts/gpu_check.sh --prepare`):
# the four .gz files, hypothesis (pure Python), and the CPU-pretrained benchmark checkpoint, so
# both machines' comparisons start from the very same weights.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    set -e
    mkdir -p gpu_carry/fashion-mnist gpu_carry/bench
    cp /usr/share/datasets/fashion-mnist/*.gz gpu_carry/fashion-mnist/
    .venv/bin/pip install -q --target gpu_carry/site hypothesis tomli
    cp runs/bench/fp-mobilenet-n10000-e3-b128.safetensors gpu_carry/bench/
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
    step "step time, ResNet-18 224x224 batch 256" 150 \
        $PY benchmarks/step_time.py --device cuda --models resnet18 --image-size 224 --batch 256
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
    (timeout $((COMPARE_SECONDS - 10)) $PY -m pytest -q -p no:cacheprovider > "$OUT_DIR/pytest.log" 2>&1; echo "pytest rc=$?" >> "$OUT_DIR/pytest.log") &
    if wants compare; then
        # shellcheck disable=SC2086
        step "compare.py, 10 seeds on the GPU" "$COMPARE_SECONDS" \
            $PY benchmarks/compare.py --device cuda --seeds 10 --jobs 12 --cache "$cache" --reuse \
                ${COMPARE_ARGS:-}
    fi
    # the table of every cell that finished (also when cut short or run for some methods only)
    $PY benchmarks/compare.py --device cuda --seeds 10 --cache "$cache" --cached \
        --out "$OUT_DIR/compare-gpu.md" --json "$OUT_DIR/compare-gpu.json"
    wait
    tail -n 15 "$OUT_DIR/pytest.log"
else
    echo "no CUDA: the GPU steps are skipped; the tests run on the CPU"
    step "pytest" 900 $PY -m pytest -q -x -p no:cacheprovider
fi
