"""Packing level indices near their information bound: base-k groups in a little-endian bit stream.

An index into ``k`` levels carries ``log2 k`` bits of information; storing it in ``ceil(log2 k)``
bits wastes the rest (ternary: 2 bits for 1.585). So ``size`` consecutive indices form one group,
the base-``k`` number ``sum_j index_j k**j``, which needs only ``bits = bit_length(k**size - 1)``
bits: ternary packs 29 indices in 46 bits (1.586 bits each), five levels 3 in 7 bits, seven levels
16 in 45. :func:`grouping` picks the densest group of at most ``MAX_GROUP_BITS`` bits; for
``k = 2**m`` the stream is that of plain ``m``-bit fields, so binary files do not change.

The groups follow each other with no padding, little-endian at both levels: bit ``t`` of group
``i`` is stream bit ``i * bits + t``, and stream bit ``s`` is bit ``s % 8`` of byte ``s // 8``. A
last group holding only ``r < size`` indices takes ``bit_length(k**r - 1)`` bits. With
``size = 1`` this is the layout of format version 2 (one ``ceil(log2 k)``-bit field per index),
which is how old files are read.

Groups of at most 56 bits keep every value, shifted by up to 7 bits within its first byte, below
2**63: the whole stream is written and read with int64 tensor operations, no Python loop over
weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_GROUP_BITS = 56


@dataclass(frozen=True)
class Grouping:
    """``size`` indices into ``levels`` levels stored as one base-``levels`` number of ``bits`` bits."""

    levels: int
    size: int
    bits: int

    def __post_init__(self) -> None:
        ok = all(isinstance(v, int) and not isinstance(v, bool)
                 for v in (self.levels, self.size, self.bits))
        if not (ok and 2 <= self.levels <= 256 and 1 <= self.bits <= MAX_GROUP_BITS
                and self.size >= 1 and self.levels**self.size <= 2**self.bits):
            raise ValueError(f"invalid grouping: {self.size} indices into {self.levels} levels "
                             f"in {self.bits} bits (at most {MAX_GROUP_BITS} bits, "
                             f"levels**size <= 2**bits)")

    @property
    def bits_per_index(self) -> float:
        return self.bits / self.size

    def stream_bits(self, count: int) -> int:
        """Bits holding ``count`` indices: full groups, then a shorter last group."""
        full, rest = divmod(count, self.size)
        return full * self.bits + (self.levels**rest - 1).bit_length()

    def nbytes(self, count: int) -> int:
        return (self.stream_bits(count) + 7) // 8


def grouping(n_levels: int) -> Grouping:
    """The densest grouping of at most ``MAX_GROUP_BITS`` bits; on a tie the largest group, since
    fewer groups unpack faster (binary: 56 one-bit fields per group, the same stream as 1 bit each)."""
    if not isinstance(n_levels, int) or not 2 <= n_levels <= 256:
        raise ValueError(f"the number of levels must be an integer from 2 to 256, got {n_levels!r}")
    best = None
    for size in range(1, MAX_GROUP_BITS + 1):
        bits = (n_levels**size - 1).bit_length()
        if bits > MAX_GROUP_BITS:
            break
        if best is None or bits * best.size <= best.bits * size:
            best = Grouping(n_levels, size, bits)
    return best


def bits_per_weight(n_levels: int) -> float:
    """Bits one weight of ``n_levels`` levels takes in the exported file (:func:`grouping`'s
    density): 1 binary, 46/29 = 1.586 ternary, 7/3 five levels; log2 k is the bound."""
    return grouping(n_levels).bits_per_index


def field_grouping(n_levels: int) -> Grouping:
    """One index per ``ceil(log2 k)``-bit field: the layout of format version 2."""
    return Grouping(n_levels, 1, max(1, math.ceil(math.log2(n_levels))))


def pack_indices(indices: torch.Tensor, layout: Grouping) -> torch.Tensor:
    """Pack ``indices`` (integers in ``[0, layout.levels)``, any shape, flattened) into uint8."""
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    flat = indices.detach().flatten().cpu().to(torch.int64)
    k, size = layout.levels, layout.size
    if flat.numel() and (flat.min() < 0 or flat.max() >= k):
        raise ValueError(f"indices must lie in [0, {k}), "
                         f"got values in [{int(flat.min())}, {int(flat.max())}]")
    digits = torch.cat([flat, flat.new_zeros(-flat.numel() % size)]).view(-1, size)
    values = digits[:, -1].clone()
    for j in range(size - 2, -1, -1):   # Horner: index_0 is the least significant digit
        values.mul_(k).add_(digits[:, j])
    start = torch.arange(values.numel(), dtype=torch.int64) * layout.bits
    shifted = values << (start & 7)      # < 2**(56 + 7): still a positive int64
    byte = start >> 3
    nbytes = layout.nbytes(flat.numel())
    stream = torch.zeros(nbytes + 8, dtype=torch.int64)
    for j in range((layout.bits + 7 + 7) // 8):
        # groups own disjoint bits, so adding their bytes is OR-ing them
        stream.index_add_(0, byte + j, (shifted >> (8 * j)) & 0xFF)
    return stream[:nbytes].to(torch.uint8)


def unpack_indices(packed: torch.Tensor, layout: Grouping, count: int) -> torch.Tensor:
    """The ``count`` indices stored in ``packed`` by :func:`pack_indices`, as a 1-D int64 tensor.

    A corrupted stream can hold group values of ``k**size`` or more; their top digit is then
    ``k`` or more: callers check ``max() < levels``.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed indices must be a 1-D uint8 tensor, got {packed.dtype} "
                         f"of shape {tuple(packed.shape)}")
    expected = layout.nbytes(count)
    if packed.numel() != expected:
        raise ValueError(f"{count} indices in groups of {layout.size} in {layout.bits} bits "
                         f"take {expected} bytes, got {packed.numel()}")
    groups = -(-count // layout.size)
    stream = torch.cat([packed.cpu(), packed.new_zeros(8)]).to(torch.int64)
    start = torch.arange(groups, dtype=torch.int64) * layout.bits
    byte = start >> 3
    window = stream[byte]
    for j in range(1, 8):   # bits 0..62 from the value's first byte: enough for 56 + 7
        window |= (stream[byte + j] & (0x7F if j == 7 else 0xFF)) << (8 * j)
    values = (window >> (start & 7)) & ((1 << layout.bits) - 1)
    k = layout.levels
    digits = torch.empty((layout.size, groups), dtype=torch.int64)  # rows: contiguous writes
    if k & (k - 1) == 0:   # k = 2**m: digits are m-bit fields
        m = k.bit_length() - 1
        for j in range(layout.size):
            torch.bitwise_and(values >> (m * j), k - 1, out=digits[j])
    else:
        for j in range(layout.size - 1):
            quotient = torch.div(values, k, rounding_mode="trunc")   # values >= 0: floor
            torch.sub(values, quotient * k, out=digits[j])
            values = quotient
        digits[-1] = values
    return digits.t().reshape(-1)[:count]
