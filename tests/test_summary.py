"""cbp.files.summary: the per-layer size table, worked out by hand."""

import torch
import torch.nn as nn
from conftest import small_net

import cbp
from cbp.files.summary import summary


def test_summary_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 3), nn.Linear(3, 2))
    cbp.prepare(model, cbp.CBPConfig(levels="shift1"))
    result = summary(model)
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["0", "1", "2", "3"]
    assert rows["2"].kind == "QuantLinear" and rows["2"].params == 15 and rows["2"].bits == 7 / 3
    # float: 12 weights + 3 biases; packed: 12 indices into 5 levels, one short group of
    # bit_length(5**12 - 1) = 28 bits -> 4 bytes; + 3 biases + 5 factors + 1 scale.
    assert (rows["2"].float_bytes, rows["2"].packed_bytes) == (60, 4 + 12 + 20 + 4)
    # BatchNorm: weight, bias, running mean and var (float32), num_batches_tracked (int64).
    assert (rows["1"].params, rows["1"].bits, rows["1"].float_bytes) == (8, 32, 4 * 16 + 8)
    assert rows["1"].packed_bytes == rows["1"].float_bytes
    assert result.params == sum(p.numel() for p in model.parameters())
    assert result.float_bytes == sum(t.nbytes for t in cbp.convert(model).state_dict().values())
    text = str(result)
    assert " 2.333 " in text and "QuantLinear" in text and "total" in text and f"{result.ratio:.1f}x" in text


def test_summary_of_plain_model_is_all_float():
    result = summary(small_net())
    assert all(r.bits == 32 and r.packed_bytes == r.float_bytes for r in result.rows)
    assert result.ratio == 1.0
