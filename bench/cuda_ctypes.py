"""The CUDA driver through ctypes for the probes, which need no torch: the library, a status
check, and device 0's primary context (the one torch shares) made current."""

from __future__ import annotations

import ctypes

cuda = ctypes.CDLL("libcuda.so.1")


def ok(r, what):
    if r != 0:
        raise RuntimeError(f"{what}: CUDA error {r}")


def primary_context() -> ctypes.c_void_p:
    """Initialise the driver and make device 0's primary context current; returns it (make it
    current again on other threads)."""
    ok(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    ok(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
    ok(cuda.cuCtxSetCurrent(ctx), "set current")
    return ctx
