"""Seconds to sample text from the demo GPT (cbp/configs/gpt.toml's model), with and without cbp's
KV cache, side by side in one process.

"without" is the loop ``cbp.generate`` ran before it had a cache: the whole last-``context``
window through the (prepared) model for every token. Weights are random: the speed does not
depend on them. Run it on one quiet core:

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/generate_time.py --tokens 300
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(0, 65, (1, 6))    # "ROMEO:" is 6 characters
    for label in ("float", "ternary"):
        model = gpt(65)                       # the Shakespeare vocabulary: 65 characters
        if label == "ternary":
            cbp.prepare(model, cbp.CBPConfig("ternary", **CBP_SELECTION))
        times: dict[str, list[float]] = {"without cache": [], "with cache": []}
        for _ in range(args.repeats):
            for name, fn in (("without cache", generate_without_cache), ("with cache", generate)):
                start = time.perf_counter()
                out = fn(model, prompt, args.tokens, seed=0)
                times[name].append(time.perf_counter() - start)
            assert torch.equal(out, generate_without_cache(model, prompt, args.tokens, seed=0))
        before, after = (statistics.median(t) for t in times.values())
        print(f"{label:8} {args.tokens} tokens: without cache {before:.2f} s, with cache "
              f"{after:.2f} s, {before / after:.1f}x (median of {args.repeats}, same text)")


if __name__ == "__main__":
    main()
