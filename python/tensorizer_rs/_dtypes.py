"""Dtype strings as CoreWeave stores them, and their torch / numpy counterparts."""

from __future__ import annotations

from typing import Any

# torch dtype name -> numpy-native stored string (CoreWeave takes numpy's dtype.str).
NATIVE = {
    "float32": "<f4",
    "float16": "<f2",
    "float64": "<f8",
    "int8": "|i1",
    "uint8": "|u1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "bool": "|b1",
    "complex64": "<c8",
    "complex128": "<c16",
}
CONTAINER_TO_TORCH = {v: k for k, v in NATIVE.items()}
QUANTIZED = {"quint8", "qint8", "qint32", "quint4x2", "quint2x4"}


def torch_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def stored_string(dtype: Any, itemsize: int) -> str:
    """The dtype string CoreWeave's writer stores for a torch dtype."""
    name = torch_name(dtype)
    if name in NATIVE:
        return NATIVE[name]
    if name in QUANTIZED:
        raise NotImplementedError(f"quantized dtype torch.{name} cannot be serialized")
    if itemsize not in (1, 2, 4, 8):
        raise NotImplementedError(f"dtype torch.{name} has unsupported item size {itemsize}")
    order = "|" if itemsize == 1 else "<"
    return f"{order}V{itemsize}\0torch.{name}"


def container_string(dtype: Any, itemsize: int) -> str:
    """The signed-int container of the same width, used where an opaque string can't be read."""
    return ("|" if itemsize == 1 else "<") + f"i{itemsize}"


def resolve_torch(container: str, opaque_name: str | None):
    """(container torch dtype, final torch dtype) for an index entry."""
    import torch

    base = getattr(torch, CONTAINER_TO_TORCH[container])
    if opaque_name is None:
        return base, base
    final = getattr(torch, opaque_name, None)
    if not isinstance(final, torch.dtype):
        raise TypeError(f"unknown torch dtype 'torch.{opaque_name}' (not in this torch build)")
    return base, final
