"""What a context shift costs in quality: a language-model checkpoint's validation loss by how many
characters of context each prediction sees.

``cbp generate --context-shift N`` (``cbp.zoo.gpt.generate(..., context_shift=N)``) re-reads its
window once every N tokens past the context instead of every token: each token then sees between
``context - N + 1`` and ``context`` tokens, each about equally often. Teacher-forced on the
validation windows, the loss at position ``p`` of a window is the loss with ``p + 1`` tokens of
context, so the loss a shift gives is the mean over positions ``context - N`` ... ``context - 1``;
N = 1 is the last position alone (the default: the whole context for every token).

    python benchmarks/context_loss.py runs/gpt/pretrain/checkpoint.pt --shifts 1 16 32 64 96 128
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cbp.core.layers import convert, quantized_layers
from cbp.training.runs import load_model
from cbp.zoo.data import load_dataset


@torch.no_grad()
def loss_by_position(model, data, batch_size: int = 64) -> torch.Tensor:
    """Mean cross-entropy (nats) at each position of the windows of ``data``."""
    model = convert(model) if quantized_layers(model) else model
    model.eval()
    total, count = None, 0
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    for x, y in tqdm(loader, desc="validation windows", unit="batch"):
        logits = model(x)
        loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").double().sum(0)
        total = loss if total is None else total + loss
        count += len(x)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--shifts", type=int, nargs="+", default=[1, 16, 32, 64, 96, 128])
    parser.add_argument("--data-dir", help="the Shakespeare folder (default: cbp's cache)")
    parser.add_argument("--limit", type=int, help="validation windows at most (default: all)")
    args = parser.parse_args()
    model, _ = load_model(args.checkpoint)
    data, _, _ = load_dataset("shakespeare", args.data_dir, train=False, limit=args.limit)
    per_position = loss_by_position(model, data)
    context = per_position.numel()
    print(f"{args.checkpoint}: {len(data)} validation windows of {context} characters")
    print(f"{'context shift':>14} {'context seen':>14} {'val loss':>9} {'vs shift 1':>11}")
    base = float(per_position[-1])
    for shift in args.shifts:
        loss = float(per_position[context - shift:].mean())
        print(f"{shift:14d} {f'{context - shift + 1}-{context}':>14} {loss:9.4f} "
              f"{100 * (loss / base - 1):+10.2f}%")


if __name__ == "__main__":
    main()
