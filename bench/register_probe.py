#!/usr/bin/env python3
"""Can the GPU copy straight out of the page cache fast enough to beat staging? (GPU machine)

    python3 bench/register_probe.py [--gib 8] [--dir /tmp/regprobe]

Writes a file, reads it into the page cache, maps it read-only and times, in one run:
pinned host->device (the limit), cuMemHostRegister(READ_ONLY) of the mapping in 1..16 threads
(each its own slice) and the matching unregisters, a copy of the registered whole, and a
pipeline where each thread registers a piece, copies it on its own stream and unregisters it.
Prints GB/s per variant and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import threading
import time

from cuda_ctypes import cuda, ok, primary_context

MiB, GiB = 1 << 20, 1 << 30
READ_ONLY = 0x08  # CU_MEMHOSTREGISTER_READ_ONLY

cuda.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
cuda.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
cuda.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
cuda.cuMemHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
cuda.cuMemcpyHtoDAsync_v2.argtypes = [
    ctypes.c_uint64,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
]
cuda.cuStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
cuda.cuStreamSynchronize.argtypes = [ctypes.c_void_p]


def in_threads(n, fn):
    """Run fn(k) in n threads (each with the context current); wall seconds."""
    ctx = CTX
    errors = []

    def body(k):
        try:
            ok(cuda.cuCtxSetCurrent(ctx), "set current")
            fn(k)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def stream():
    s = ctypes.c_void_p()
    ok(cuda.cuStreamCreate(ctypes.byref(s), 1), "stream")
    return s


def main():
    global CTX
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, default=8)
    ap.add_argument("--dir", default="/tmp/regprobe")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    CTX = primary_context()
    size = args.gib * GiB
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "probe.bin")
    block = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        f.writelines(block for _ in range(size // len(block)))
    with open(path, "rb") as f:  # into the page cache
        while f.read(256 * MiB):
            pass
    fd = os.open(path, os.O_RDONLY)
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    dptr = ctypes.c_uint64()
    ok(cuda.cuMemAlloc_v2(ctypes.byref(dptr), size), "cuMemAlloc")
    res = {"gib": args.gib}

    def log(k, v):
        res[k] = v
        print(f"{k:<44}{v}", flush=True)

    # The limit: one pinned buffer copied to the device (4 streams of 64 MiB pieces).
    pinned = ctypes.c_void_p()
    ok(cuda.cuMemHostAlloc(ctypes.byref(pinned), GiB, 0), "cuMemHostAlloc")
    ctypes.memset(pinned, 1, GiB)
    streams = [stream() for _ in range(16)]
    for rep in range(2):
        t0 = time.perf_counter()
        for i in range(16):
            off = (i % 16) * 64 * MiB
            s = streams[i % 4]
            ok(cuda.cuMemcpyHtoDAsync_v2(dptr.value + off, pinned.value + off, 64 * MiB, s), "cp")
        for s in streams[:4]:
            ok(cuda.cuStreamSynchronize(s), "sync")
        dt = time.perf_counter() - t0
    log("pinned_h2d_gbps", round(GiB / dt / 1e9, 2))

    # Register the mapping in n threads (equal slices), copy it whole, unregister.
    for n in (1, 2, 4, 8, 16):
        part = size // n

        def reg(k, part=part):
            ok(cuda.cuMemHostRegister_v2(addr + k * part, part, READ_ONLY), "register")

        def unreg(k, part=part):
            ok(cuda.cuMemHostUnregister(addr + k * part), "unregister")

        t_reg = in_threads(n, reg)
        t0 = time.perf_counter()
        piece = 64 * MiB
        for i in range(size // piece):
            s = streams[i % 4]
            ok(cuda.cuMemcpyHtoDAsync_v2(dptr.value + i * piece, addr + i * piece, piece, s), "cp")
        for s in streams[:4]:
            ok(cuda.cuStreamSynchronize(s), "sync")
        t_cp = time.perf_counter() - t0
        t_unreg = in_threads(n, unreg)
        log(
            f"register {n:>2} threads: reg/copy/unreg GB/s",
            [round(size / t / 1e9, 1) for t in (t_reg, t_cp, t_unreg)],
        )
        log(f"  register {n:>2}: end to end GB/s", round(size / (t_reg + t_cp + t_unreg) / 1e9, 2))

    # Pipeline: thread k takes pieces k, k+n, ...: register, copy on its stream, wait, unregister.
    for n, piece_mib in ((4, 64), (8, 64), (8, 256), (16, 128), (16, 256)):
        piece = piece_mib * MiB
        count = size // piece

        def work(k, n=n, piece=piece, count=count):
            s = streams[k]
            for i in range(k, count, n):
                a = addr + i * piece
                ok(cuda.cuMemHostRegister_v2(a, piece, READ_ONLY), "register")
                ok(cuda.cuMemcpyHtoDAsync_v2(dptr.value + i * piece, a, piece, s), "cp")
                ok(cuda.cuStreamSynchronize(s), "sync")
                ok(cuda.cuMemHostUnregister(a), "unregister")

        dt = in_threads(n, work)
        log(f"pipeline {n:>2} threads x {piece_mib:>3} MiB GB/s", round(size / dt / 1e9, 2))

    # For comparison: pread into pinned memory + copy (what the loader does), 12 threads.
    chunk = 8 * MiB
    bufs = []
    for _ in range(12 * 2):
        p = ctypes.c_void_p()
        ok(cuda.cuMemHostAlloc(ctypes.byref(p), chunk, 0), "cuMemHostAlloc")
        bufs.append(p)
    libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
    libc.pread.restype = ctypes.c_ssize_t

    buf_streams = [stream() for _ in bufs]

    def staged(k, n=12):
        # Two buffers per thread, each with its stream: wait for a buffer's copy before reuse.
        for j, i in enumerate(range(k, size // chunk, n)):
            b, s = bufs[2 * k + j % 2].value, buf_streams[2 * k + j % 2]
            ok(cuda.cuStreamSynchronize(s), "sync")
            libc.pread(fd, b, chunk, i * chunk)
            ok(cuda.cuMemcpyHtoDAsync_v2(dptr.value + i * chunk, b, chunk, s), "cp")
        for s in buf_streams[2 * k : 2 * k + 2]:
            ok(cuda.cuStreamSynchronize(s), "sync")

    dt = in_threads(12, staged)
    log("staged (pread 12 threads x 8 MiB, ctypes) GB/s", round(size / dt / 1e9, 2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    os.unlink(path)


if __name__ == "__main__":
    main()
