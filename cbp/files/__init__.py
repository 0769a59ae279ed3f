"""Bytes on disk: checkpoints (atomic, checked), bit packing, the packed safetensors export and
its reader, tied weights, ONNX, size tables.

Imports :mod:`cbp.core` only.
"""
