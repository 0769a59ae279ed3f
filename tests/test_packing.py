"""cbp.files.packing: grouping level indices into as few bits as the level count allows.

The bit layouts are worked out by hand; test_properties.py checks the round trip on random input.
"""

import math

import numpy as np
import pytest
import torch

from cbp.files.packing import (
    MAX_GROUP_BITS,
    Grouping,
    field_grouping,
    grouping,
    pack_indices,
    unpack_indices,
)


def test_grouping_by_hand():
    # 3**29 = 2**45.96: 29 trits in 46 bits; 5**3 = 125 < 2**7 (taken as 24 in 56, same density).
    assert grouping(3) == Grouping(3, 29, 46)
    assert grouping(5) == Grouping(5, 24, 56) and grouping(5).bits_per_index == 7 / 3
    assert grouping(7) == Grouping(7, 16, 45)   # 7**16 = 2**44.9
    assert grouping(2) == Grouping(2, 56, 56) and grouping(256) == Grouping(256, 7, 56)
    # format version 2: one ceil(log2 k)-bit field per index, 1 bit for binary
    assert [field_grouping(k) for k in (2, 3, 5, 256)] == [
        Grouping(2, 1, 1), Grouping(3, 1, 2), Grouping(5, 1, 3), Grouping(256, 1, 8)]
    for k in range(2, 257):
        group = grouping(k)
        assert k**group.size <= 2**group.bits <= 2**MAX_GROUP_BITS
        assert group.bits_per_index <= field_grouping(k).bits  # never worse than ceil(log2 k)
        assert group.bits_per_index <= 1.02 * math.log2(k)     # worst: k = 129, 7.14 bits of 7.01


@pytest.mark.parametrize("k", range(2, 257))
def test_pack_round_trip_every_k(k):
    gen = torch.Generator().manual_seed(k)
    for group in (grouping(k), field_grouping(k)):
        for count in sorted({0, 1, group.size - 1, group.size, group.size + 1, 3 * group.size + 2,
                             1001}):
            indices = torch.randint(0, k, (count,), generator=gen)
            indices[::7] = k - 1   # the largest group values too
            packed = pack_indices(indices, group)
            assert packed.dtype == torch.uint8 and packed.numel() == group.nbytes(count)
            assert packed.numel() == math.ceil(group.stream_bits(count) / 8)
            assert torch.equal(unpack_indices(packed, group, count), indices)


def test_pack_bit_order_by_hand():
    # five trits per byte: 1 + 2*3 + 0*9 + 1*27 + 2*81 = 196; a last group of two trits,
    # 1 + 2*3 = 7, takes bit_length(3**2 - 1) = 4 bits.
    trits = Grouping(3, 5, 8)
    assert pack_indices(torch.tensor([1, 2, 0, 1, 2]), trits).tolist() == [196]
    assert pack_indices(torch.tensor([2, 2, 2, 2, 2, 1, 2]), trits).tolist() == [242, 7]
    assert trits.stream_bits(7) == 12
    # 1,2,3,4,5 in 3 bits, LSB first: 100 010 110 001 10|1 -> bytes 0b11010001, 0b01011000,
    # one field per index (format version 2) or 18 per 54-bit group alike.
    for group in (field_grouping(8), grouping(8)):
        assert pack_indices(torch.tensor([1, 2, 3, 4, 5]), group).tolist() == [209, 88]
    bits = torch.randint(0, 2, (129,))
    expected = np.packbits(bits.numpy().astype(np.uint8), bitorder="little")
    assert pack_indices(bits, grouping(2)).tolist() == expected.tolist()
    assert pack_indices(torch.tensor([[7, 200], [0, 255]], dtype=torch.uint8),
                        field_grouping(256)).tolist() == [7, 200, 0, 255]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="invalid grouping"):
        Grouping(3, 6, 9)   # 3**6 = 729 > 2**9
    with pytest.raises(ValueError, match="invalid grouping"):
        Grouping(2, 57, 57)
    with pytest.raises(ValueError, match="invalid grouping"):
        Grouping(257, 1, 9)   # fits 9 bits, but a file holds at most 256 levels
    for bad in ((3.0, 1, 2), (3, 1.0, 2), (3, 1, 2.0), (2, True, 1), (3, 0, 1), (1, 1, 1)):
        with pytest.raises(ValueError, match="invalid grouping"):
            Grouping(*bad)   # only integers (no bools) in range
    for bad in (257, 1, 3.0, "3"):
        with pytest.raises(ValueError, match="from 2 to 256"):
            grouping(bad)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        pack_indices(torch.tensor([0, 3]), grouping(3))
    with pytest.raises(ValueError, match="integer"):
        pack_indices(torch.tensor([0.5]), grouping(3))
    with pytest.raises(ValueError, match="take 2 bytes, got 3"):
        unpack_indices(torch.zeros(3, dtype=torch.uint8), Grouping(3, 5, 8), 7)
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\]"):
        pack_indices(torch.tensor([0, -1, 1]), grouping(3))
    with pytest.raises(ValueError, match="integer tensor, got torch.bool"):
        pack_indices(torch.tensor([True]), grouping(2))
    for bad in (torch.zeros(2, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="1-D uint8"):
            unpack_indices(bad, field_grouping(256), 2)
