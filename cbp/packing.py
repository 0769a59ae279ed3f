"""Bit-packing of level indices: ``bits`` bits per index, no padding between indices.

The stream is little-endian at both levels: bit ``k`` of index ``i`` is stream bit
``i * bits + k``, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. Indices of 3, 5, 6 or 7
bits therefore straddle byte boundaries; going through a bit matrix (one byte per bit) handles every
width the same way, vectorised, at a transient cost of ``bits`` bytes per index.
"""

from __future__ import annotations

import torch

_BYTE_BITS = torch.arange(8, dtype=torch.uint8)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` indices of ``bits`` bits: ceil(count * bits / 8)."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the non-negative integers ``indices`` (any shape, flattened) into a 1-D uint8 tensor."""
    _check_bits(bits)
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    flat = indices.detach().flatten().cpu().to(torch.int64)  # uint8 would wrap 2**8 to 0
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"indices must lie in [0, {2**bits}) to fit in {bits} bits, "
                         f"got values in [{int(flat.min())}, {int(flat.max())}]")
    flat = flat.to(torch.uint8)
    stream = ((flat[:, None] >> _BYTE_BITS[:bits]) & 1).flatten()
    padding = packed_nbytes(flat.numel(), bits) * 8 - stream.numel()
    stream = torch.cat([stream, stream.new_zeros(padding)]).view(-1, 8)
    return (stream << _BYTE_BITS).sum(dim=1, dtype=torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` indices stored in ``packed`` by :func:`pack_indices`, as a 1-D int64 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed indices must be a 1-D uint8 tensor, got {packed.dtype} "
                         f"of shape {tuple(packed.shape)}")
    expected = packed_nbytes(count, bits)
    if packed.numel() != expected:
        raise ValueError(f"{count} indices of {bits} bits take {expected} bytes, "
                         f"got {packed.numel()}")
    stream = ((packed.cpu()[:, None] >> _BYTE_BITS) & 1).flatten()[: count * bits]
    weights = torch.arange(bits, dtype=torch.int64)
    return (stream.view(count, bits).to(torch.int64) << weights).sum(dim=1)
