"""How much of a short CBP run the penalty pass's compile policy costs, each policy in a fresh
process with an empty compile cache.

``--policy on`` compiles one graph at the first step: what "auto" did for any run announcing at
least 200 steps before it weighed the cost. ``--policy auto`` is today's cost-based choice
(:mod:`cbp.core.penalty`), ``eager`` never compiles. Random data, the real Lagrangian step; the
compile's cost is the first compiled step's time beyond the median step. Run it on one quiet core:

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/compile_share.py --model gpt20m --steps 200

or on a GPU with ``--device cuda`` (each step's time then waits for the GPU to finish it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import cbp
from cbp.zoo.gpt import CBP_SELECTION, GPT, GPTConfig
from cbp.zoo.models import build_model

# ~20M parameters, built from a config: 6 blocks of width 512 (18.9M of them quantized)
GPT20M = GPTConfig(vocab_size=84, context=128, layers=6, heads=8, width=512)
POLICIES = {"on": True, "auto": None, "eager": False}   # --policies name: compile_penalty


def one_run(model_name: str, steps: int, policy: str, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    if model_name == "gpt20m":
        model, selection = GPT(GPT20M), CBP_SELECTION
        batch = lambda: (torch.randint(0, 84, (1, 128), device=dev),) * 2  # noqa: E731
        loss_of = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
    else:   # the demo's model and batch: ResNet-20 on 28x28 grey images, batch 128
        model, selection = build_model("resnet20", num_classes=10, in_channels=1), {}
        batch = lambda: (torch.randn(128, 1, 28, 28, device=dev),  # noqa: E731
                         torch.randint(0, 10, (128,), device=dev))
        loss_of = F.cross_entropy
    model.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    config = cbp.CBPConfig("binary", compile_penalty=POLICIES[policy], **selection)
    cbp.prepare(model, config)
    optimizer = torch.optim.Adam(cbp.param_groups(model, 0.0), lr=1e-3)
    lagrangian = cbp.Lagrangian(model, config, optimizer)
    lagrangian.plan(steps)
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        x, y = batch()
        optimizer.zero_grad()
        loss_of(model(x), y).backward()
        lagrangian.step()
        sync()
        times.append(time.perf_counter() - tic)
    compiled = lagrangian._kernel.compiled is not None
    first = next((i for i, t in enumerate(times) if t == max(times)), 0)
    compile_cost = max(times) - statistics.median(times) if compiled else 0.0
    return {"model": model_name, "policy": policy, "steps": steps, "wall": sum(times),
            "compile": compile_cost, "compile_step": first + 1, "median_step": statistics.median(times),
            "decision": getattr(lagrangian, "penalty_pass", None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt20m", "resnet20"], default="gpt20m")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=["on", "auto"])
    parser.add_argument("--keep-cache", action="store_true",
                        help="one compile cache for the policies in turn: a later run of the same "
                             "policy shows what a user's second run pays (the first: an empty one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.model, args.steps, args.child, args.device)))
        return
    with tempfile.TemporaryDirectory() as shared:
        for run, policy in enumerate(args.policies):
            with tempfile.TemporaryDirectory() as fresh:   # no compiled graph reused from before
                cache = shared if args.keep_cache else fresh
                argv = ["--model", args.model, "--steps", str(args.steps), "--device", args.device]
                out = subprocess.run([sys.executable, __file__, *argv, "--child", policy],
                                     capture_output=True, text=True, check=True,
                                     env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            cached = ", compile cache of the runs before" if args.keep_cache and run else ""
            print(f"{r['model']} on {args.device}, {r['steps']} steps, policy {policy}{cached}: wall "
                  f"{r['wall']:.1f} s, compile {r['compile']:.1f} s "
                  f"({100 * r['compile'] / r['wall']:.1f}% of the run, step "
                  f"{r['compile_step']}), median step {r['median_step']:.3f} s; {r['decision']}",
                  flush=True)


if __name__ == "__main__":
    main()
