"""Seconds to sample text from the demo GPT (cbp/configs/gpt.toml's model), with and without cbp's
KV cache, side by side in one process.

"without" is the loop ``cbp.zoo.gpt.generate`` ran before it had a cache: the whole
last-``context`` window through the (prepared) model for every token. "with cache" is
``generate`` with its default ``context_shift=1`` (the same text, checked); "shift N" with
``context_shift=N`` (other text past the context). Weights are random: the speed does not depend
on them. Run it on one quiet core:

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/generate_time.py --tokens 300 --shifts 32 64
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

import cbp
from cbp.zoo.gpt import CBP_SELECTION, generate, gpt


@torch.no_grad()
def generate_without_cache(model, idx: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(tokens):
        logits = model(idx[:, -model.cfg.context:])[:, -1, :].float()
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs; medians reported")
    parser.add_argument("--shifts", type=int, nargs="*", default=[],
                        help="also time generate with these context shifts (> 1)")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(0, 65, (1, 6))    # "ROMEO:" is 6 characters
    for label in ("float", "ternary"):
        model = gpt(65)                       # the Shakespeare vocabulary: 65 characters
        if label == "ternary":
            cbp.prepare(model, cbp.CBPConfig("ternary", **CBP_SELECTION))
        sides = {"without cache": generate_without_cache, "with cache": generate,
                 **{f"shift {n}": functools.partial(generate, context_shift=n) for n in args.shifts}}
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                start = time.perf_counter()
                out = fn(model, prompt, args.tokens, seed=0)
                times[name].append(time.perf_counter() - start)
                if name == "with cache":
                    assert torch.equal(out, generate_without_cache(model, prompt, args.tokens, 0))
        before = statistics.median(times["without cache"])
        print(f"{label:8} {args.tokens} tokens, median (min-max) of {args.repeats}: without cache "
              f"{before:.2f} s ({min(times['without cache']):.2f}-{max(times['without cache']):.2f}); "
              + "; ".join(f"{name} {statistics.median(t):.2f} s ({min(t):.2f}-{max(t):.2f}), "
                          f"{before / statistics.median(t):.1f}x"
                          for name, t in times.items() if name != "without cache")
              + " (with cache: the same text)")


if __name__ == "__main__":
    main()
