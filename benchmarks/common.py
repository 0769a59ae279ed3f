"""What the benchmark scripts share besides the computation of a cell (that is ``compare.py``'s
and ``paired.py``'s, hashed into every cell's code version): the machine under a results table,
writing the table out, and the worker-pool flags of ``compare.py`` and ``ladder.py``.

Imported as ``common``: a script's own folder is on ``sys.path`` when it runs, and ``compare.py``
puts it there for the tests that load it by path.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, 1 thread per worker")


def publish(text: str, workers: str, started: float, out: str | None) -> None:
    """Print a results table with the machine, the workers, the wall time and the command under
    it, and write it to ``out`` if given."""
    text += (f"\nMachine: {machine()}; {workers}; total wall "
             f"{time.perf_counter() - started:.0f} s.\nCommand: `{' '.join(sys.argv)}`\n")
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


def add_pool_flags(parser: argparse.ArgumentParser) -> None:
    """``--jobs`` and ``--cache`` of the scripts that compute the cells of ``compare.py`` (the
    same cells, so the same cache)."""
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, each pinned to a core")
    parser.add_argument("--cache", default="runs/bench", help="checkpoints, runs and cell results")
