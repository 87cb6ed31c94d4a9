#!/usr/bin/env python3
"""How fast pageable host memory reaches the GPU before any pinned staging exists (GPU machine).

    python3 bench/pageable_probe.py FILE [--mib 1024]

A fresh process's load waits ~20 ms for its pinned staging buffers. This times the other way
to start: cuMemcpyHtoD straight from an mmap of the (cached) file, which the driver stages
through its own pinned buffers, by threads and piece size: the time to the first piece and the
GB/s over the first MiB given. Each configuration runs in a fresh process (the driver's
staging grows as it is used).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import subprocess
import sys
import time

MiB = 1 << 20


def child(path, total, threads, piece):
    import numpy as np
    from cuda_ctypes import cuda, ok, on_threads, primary_context

    cuda.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    cuda.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
    ctx = primary_context()
    dev = ctypes.c_uint64()
    ok(cuda.cuMemAlloc_v2(ctypes.byref(dev), total), "alloc")
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), total, prot=mmap.PROT_READ)
    arr = np.frombuffer(m, dtype=np.uint8)
    host = arr.ctypes.data
    first = []
    t0 = time.perf_counter()

    def copy(off):
        n = min(piece, total - off)
        ok(cuda.cuMemcpyHtoD_v2(dev.value + off, host + off, n), "copy")
        if not first:
            first.append(time.perf_counter())

    on_threads(ctx, range(0, total, piece), threads, copy)
    dt = time.perf_counter() - t0
    print(
        f"{threads:2d} threads x {piece // MiB:3d} MiB pieces: first piece "
        f"{(first[0] - t0) * 1e3:6.2f} ms, {total / dt / 1e9:6.2f} GB/s over {total // MiB} MiB",
        flush=True,
    )
    del arr
    m.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    total = min(a.mib * MiB, os.path.getsize(a.path)) // MiB * MiB
    if a.child:
        return child(a.path, total, *a.child)
    for threads in (1, 2, 4, 8):
        for piece in (2 * MiB, 8 * MiB):
            cmd = [sys.executable, os.path.abspath(__file__), a.path, "--mib", str(a.mib)]
            subprocess.run(cmd + ["--child", str(threads), str(piece)], check=False)


if __name__ == "__main__":
    main()
