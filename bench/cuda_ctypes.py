"""The CUDA driver through ctypes for the probes, which need no torch: the library, a status
check, and device 0's primary context (the one torch shares) made current; and libc's `mmap`,
`munmap` and `madvise` with their signatures, for the memory the probes page-lock."""

from __future__ import annotations

import ctypes
import threading

cuda = ctypes.CDLL("libcuda.so.1")
cuda.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
cuda.cuMemHostUnregister.argtypes = [ctypes.c_void_p]

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


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


def on_threads(ctx, items, threads: int, fn) -> None:
    """Call ``fn(item)`` for every item on ``threads`` threads taking from one queue in order,
    each with ``ctx`` current; returns when all are done."""
    left = list(items)
    lock = threading.Lock()

    def work():
        ok(cuda.cuCtxSetCurrent(ctx), "set current")
        while True:
            with lock:
                if not left:
                    return
                item = left.pop(0)
            fn(item)

    ths = [threading.Thread(target=work) for _ in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
