"""Pausing Python's cyclic garbage collector around loops that make thousands of objects."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def paused():
    """Building an index or tensors for thousands of small tensors triggers the cyclic GC over
    and over (it more than doubles their per-tensor cost); the objects made there form no
    cycles. The collector is re-enabled only if it was enabled on entry."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
