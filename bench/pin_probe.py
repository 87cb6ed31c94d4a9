#!/usr/bin/env python3
"""How long page-locking staging memory takes, by size and by how many calls (GPU machine).

    python3 bench/pin_probe.py

Times cuMemHostRegister of huge-page-backed anonymous memory (what the staging pool does):
32 calls of 8 MiB, 4 calls of 64 MiB and one of 256 MiB, each after faulting the pages in
(timed apart), cuMemAlloc of 512 MiB alone and while another thread registers memory, and
the pool's 24 first buffers made by 1-16 threads: each faulted then registered (what the
prewarm does), all faulted first, or one region registered once.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import time

from cuda_ctypes import cuda, libc, ok, on_threads, primary_context

MiB = 1 << 20
cuda.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
cuda.cuMemFree_v2.argtypes = [ctypes.c_uint64]

ctx = primary_context()


def huge(n):
    base = libc.mmap(
        None,
        n + 2 * MiB,
        mmap.PROT_READ | mmap.PROT_WRITE,
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        -1,
        0,
    )
    p = (base + 2 * MiB - 1) & ~(2 * MiB - 1)
    libc.madvise(p, n, 14)  # MADV_HUGEPAGE
    return p


def run(size, count):
    bufs = [huge(size) for _ in range(count)]
    t0 = time.perf_counter()
    for p in bufs:
        ctypes.memset(p, 0, size)
    t1 = time.perf_counter()
    for p in bufs:
        ok(cuda.cuMemHostRegister_v2(p, size, 1), "register")
    t2 = time.perf_counter()
    for p in bufs:
        cuda.cuMemHostUnregister(p)
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


for size, count in ((8 * MiB, 32), (64 * MiB, 4), (256 * MiB, 1), (8 * MiB, 32), (256 * MiB, 1)):
    fault, reg = run(size, count)
    print(
        f"{count:3d} x {size // MiB:4d} MiB: fault-in {fault:6.1f} ms, register {reg:6.1f} ms "
        f"({reg / count:.2f} ms per call)"
    )


def alloc_ms(n=512 * MiB):
    d = ctypes.c_uint64()
    t0 = time.perf_counter()
    ok(cuda.cuMemAlloc_v2(ctypes.byref(d), n), "alloc")
    dt = (time.perf_counter() - t0) * 1e3
    cuda.cuMemFree_v2(d)
    return dt


print(f"cuMemAlloc 512 MiB alone: {alloc_ms():.2f} ms, again {alloc_ms():.2f} ms")
for size, count in ((8 * MiB, 32), (256 * MiB, 1)):
    bufs = [huge(size) for _ in range(count)]
    for p in bufs:
        ctypes.memset(p, 0, size)
    done = []

    def pin(bufs=bufs, size=size, done=done):
        ok(cuda.cuCtxSetCurrent(ctx), "set current")
        for p in bufs:
            ok(cuda.cuMemHostRegister_v2(p, size, 1), "register")
        done.append(time.perf_counter())

    th = threading.Thread(target=pin)
    t0 = time.perf_counter()
    th.start()
    time.sleep(0.001)
    a = alloc_ms()
    th.join()
    print(
        f"cuMemAlloc 512 MiB while registering {count} x {size // MiB} MiB: {a:.2f} ms "
        f"(registering took {(done[0] - t0) * 1e3:.1f} ms)"
    )
    for p in bufs:
        cuda.cuMemHostUnregister(p)


# How the pool's first buffers come in a fresh process: the same 192 MiB (24 x 8 MiB, a local
# load's two buffers per reader) faulted in and registered by k threads at once, each
# buffer faulted then registered (what Pool::prewarm does), against all faulted first in
# parallel and then registered, and against one region registered once.
def anon_huge_kib():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return -1


def parallel(threads, mode, n=24, size=8 * MiB):
    bufs = [huge(size) for _ in range(n)] if mode != "one" else [huge(n * size)]
    if mode == "one":
        parts = [bufs[0] + i * size for i in range(n)]
    else:
        parts = bufs
    h0 = anon_huge_kib()
    t0 = time.perf_counter()
    firsts = []

    def make(i):
        ctypes.memset(parts[i], 0, size)
        if mode == "interleaved":
            ok(cuda.cuMemHostRegister_v2(parts[i], size, 1), "register")
            firsts.append(time.perf_counter())

    on_threads(ctx, range(n), threads, make)
    t1 = time.perf_counter()
    if mode == "after":
        for p in parts:
            ok(cuda.cuMemHostRegister_v2(p, size, 1), "register")
    elif mode == "one":
        ok(cuda.cuMemHostRegister_v2(bufs[0], n * size, 1), "register")
    t2 = time.perf_counter()
    huge_mib = (anon_huge_kib() - h0) / 1024
    if mode == "one":
        cuda.cuMemHostUnregister(bufs[0])
    else:
        for p in parts:
            cuda.cuMemHostUnregister(p)
    first = f", first buffer {(min(firsts) - t0) * 1e3:.1f} ms" if firsts else ""
    print(
        f"{threads:2d} threads, {mode:11s}: all ready {(t2 - t0) * 1e3:6.1f} ms (fault-in "
        f"{(t1 - t0) * 1e3:5.1f}, then register {(t2 - t1) * 1e3:5.1f}){first}; "
        f"huge pages {huge_mib:.0f} MiB"
    )


for mode in ("interleaved", "after", "one"):
    for k in (1, 2, 4, 8, 16):
        parallel(k, mode)
