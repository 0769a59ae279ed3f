"""How close is a packed export to the information bound, and how fast does it load?

    .venv/bin/python benchmarks/pack_size.py          # ~1 min on 2 CPU cores

For the demo model (ResNet-20, binary) and a ResNet-18 (ImageNet size, 1000 classes) with every
published level set, it exports a prepared model and prints, as a markdown table:

* ``bound``: ``sum n log2 k`` bits over the quantized weights plus the float parts (first and last
  layer, BatchNorm, biases, each layer's factors and scale) - what no lossless format can beat
  for weights whose levels are equally likely - and the file's payload against it; the header
  (safetensors table and our layout, about 1-2 KB) is reported apart;
* the payload the version-2 format would have needed (``ceil(log2 k)`` bits per weight);
* ``cbp.read_packed`` time (unpacking every weight onto its levels; median of 5) and whether
  ``cbp.load_packed`` gives a model whose outputs equal the prepared model's, bit for bit.

The file size does not depend on the weights' values (a fixed number of bits per weight), so the
models are randomly initialised.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch
import torchvision
from safetensors.torch import load as st_load

import cbp
from cbp.files.packing import field_grouping
from cbp.zoo.models import resnet20

MODELS = {  # name: (builder, input shape without the batch)
    "resnet20": (lambda: resnet20(num_classes=10, in_channels=1), (1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=1000), (3, 64, 64)),
}
CASES = [("resnet20", "binary"), ("resnet18", "binary"), ("resnet18", "ternary"),
         ("resnet18", "shift1"), ("resnet18", "shift2")]


def measure(model_name: str, levels: str, folder: str, repeats: int) -> dict:
    builder, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = builder()
    model(torch.randn(4, *shape))   # BatchNorm statistics that are not the defaults
    cbp.prepare(model, cbp.CBPConfig(levels=levels)).eval()
    path = cbp.export(model, os.path.join(folder, f"{model_name}-{levels}.safetensors"))
    quantized = cbp.quantized_layers(model)
    k = len(cbp.resolve_factors(levels))
    n = sum(layer.weight.numel() for layer in quantized.values())
    data = path.read_bytes()
    size, header = len(data), 8 + int.from_bytes(data[:8], "little")
    float_bytes = size - header - st_load(data)["packed"].numel()   # every other tensor
    bound = n * math.log2(k) / 8 + float_bytes
    v2 = sum(field_grouping(k).nbytes(layer.weight.numel()) for layer in quantized.values())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cbp.read_packed(path)
        times.append(time.perf_counter() - t0)
    x = torch.randn(8, *shape)
    with torch.no_grad():
        exact = torch.equal(cbp.load_packed(path, builder)(x), model(x))
    return {"model": model_name, "levels": levels, "n": n, "file": size, "header": header,
            "bound": bound, "v2": v2 + float_bytes, "read_s": statistics.median(times),
            "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| model | levels | quantized weights | file | header | bound | (file - header) / bound "
          "| version 2 payload / bound | read_packed | outputs equal |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|---|")
    with tempfile.TemporaryDirectory() as folder:
        for model_name, levels in CASES:
            r = measure(model_name, levels, folder, args.repeats)
            print(f"| {r['model']} | {r['levels']} | {r['n']:,} | {r['file']:,} B "
                  f"| {r['header']:,} B | {r['bound']:,.0f} B "
                  f"| {(r['file'] - r['header']) / r['bound']:.4f} | {r['v2'] / r['bound']:.4f} "
                  f"| {r['read_s'] * 1e3:.0f} ms | {'yes' if r['exact'] else 'NO'} |")


if __name__ == "__main__":
    main()
