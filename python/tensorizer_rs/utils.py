"""Helpers vLLM imports from ``tensorizer.utils``."""

from __future__ import annotations

import contextlib
import os

__all__ = ["convert_bytes", "get_mem_usage", "no_init_or_tensor"]


def convert_bytes(num: float, decimal: bool = True) -> str:
    """A human-readable size, e.g. ``1.5GB`` (decimal) or ``1.4GiB`` (binary)."""
    step = 1000.0 if decimal else 1024.0
    units = (
        ["B", "KB", "MB", "GB", "TB", "PB"] if decimal else ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    )
    num = float(num)
    for unit in units[:-1]:
        if abs(num) < step:
            return f"{num:.1f}{unit}" if unit != "B" else f"{int(num)}B"
        num /= step
    return f"{num:.1f}{units[-1]}"


def get_mem_usage() -> str:
    """A one-line summary of this process's memory use (and the GPU's, when torch sees one)."""
    parts = []
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        parts.append(f"CPU: RSS {fields.get('VmRSS', '?').strip()}")
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(
                f"GPU: allocated {convert_bytes(torch.cuda.memory_allocated())}, "
                f"reserved {convert_bytes(torch.cuda.memory_reserved())}"
            )
    except ImportError:
        pass
    return " | ".join(parts) or "unavailable"


@contextlib.contextmanager
def _no_init():
    import torch

    saved = {}
    for name in ("kaiming_uniform_", "uniform_", "normal_", "xavier_uniform_", "zeros_", "ones_"):
        saved[name] = getattr(torch.nn.init, name)
        setattr(torch.nn.init, name, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def no_init_or_tensor(loading_code=None):
    """Run ``loading_code`` (or, with no argument, return a context) with weight
    initialisation skipped and new tensors created on the meta device."""
    import torch

    @contextlib.contextmanager
    def ctx():
        with _no_init(), torch.device("meta"):
            yield

    if loading_code is None:
        return ctx()
    with ctx():
        return loading_code()
