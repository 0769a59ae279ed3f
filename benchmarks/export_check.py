"""Is the exported model truly small, and does it compute exactly what the quantized model does?

    .venv/bin/python benchmarks/export_check.py runs/demo/binary/checkpoint.pt

For a CBP checkpoint (the demo's by default) it writes the packed export and an ONNX file to a
temporary folder (or ``--out``) and prints, as a markdown table:

* the packed file's size against the ideal - the packed level indices plus the float parts
  (first and last layer, BatchNorm, biases, scales and factors), i.e. ``cbp.summary``'s total -
  and against the same model saved as float32 safetensors;
* the top-1 of the quantized model (straight-through forward, eval mode) and of the model
  :func:`cbp.load_packed` rebuilds from the file, on the whole test set, and on how many images
  their predictions agree, with the largest gap between their logits;
* the ONNX file's size and the largest gap between onnxruntime and PyTorch on a test batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from safetensors.torch import save as st_save
from torch.utils.data import DataLoader

import cbp
from cbp.files.onnx_export import check_onnx, export_onnx
from cbp.training.runs import load_model
from cbp.zoo.data import load_dataset
from cbp.zoo.models import rebuild_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="runs/demo/binary/checkpoint.pt")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", help="folder for model.safetensors and model.onnx (default: temp)")
    args = parser.parse_args()
    if not os.path.exists(args.checkpoint):
        print(f"export_check: {args.checkpoint} not found (run `make demo` first)", file=sys.stderr)
        return 2
    model, meta = load_model(args.checkpoint)
    model.eval()
    out = args.out or tempfile.mkdtemp(prefix="cbp-export-")
    os.makedirs(out, exist_ok=True)
    packed_path = cbp.export(model, os.path.join(out, "model.safetensors"))

    sizes = cbp.summary(model)
    file_bytes = os.path.getsize(packed_path)
    float_file = len(st_save(cbp.convert(model).state_dict()))
    rebuilt = cbp.load_packed(packed_path, lambda: rebuild_model(meta))
    test_data, _, _ = load_dataset(meta["dataset"], args.data_dir, False)
    result = cbp.agreement(model, rebuilt, DataLoader(test_data, batch_size=500))
    correct_q, correct_r = result.correct

    batch = torch.stack([test_data[i][0] for i in range(64)])
    onnx_path = export_onnx(model, os.path.join(out, "model.onnx"), batch[:2])
    onnx_gap = check_onnx(onnx_path, model, batch)

    rows = [
        ("packed file (safetensors)", f"{file_bytes:,} B"),
        ("ideal: packed bits + float parts", f"{sizes.packed_bytes:,} B"),
        ("file / ideal", f"{file_bytes / sizes.packed_bytes:.3f}"),
        ("float32 safetensors of the same model", f"{float_file:,} B"),
        ("float32 / packed file", f"{float_file / file_bytes:.1f}x"),
        ("ONNX file (float weights on the levels)", f"{os.path.getsize(onnx_path):,} B"),
        ("test images", f"{result.samples:,}"),
        ("top-1 quantized model (STE forward)", f"{100 * correct_q / result.samples:.2f}%"),
        ("top-1 model rebuilt from the file", f"{100 * correct_r / result.samples:.2f}%"),
        ("predictions that agree", f"{result.same_top1:,} / {result.samples:,}"),
        ("largest logit gap, file vs quantized", f"{result.max_logit_gap:.3g}"),
        ("largest gap, onnxruntime vs torch (64 images)", f"{onnx_gap:.3g}"),
    ]
    print(f"checkpoint: {args.checkpoint}; files in {out}\n")
    print("| | |\n|---|---|")
    print("\n".join(f"| {k} | {v} |" for k, v in rows))
    print(f"\n{sizes}")
    return 0 if result.fraction == 1 and file_bytes <= 1.1 * sizes.packed_bytes else 1


if __name__ == "__main__":
    sys.exit(main())
