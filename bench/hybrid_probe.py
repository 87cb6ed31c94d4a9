#!/usr/bin/env python3
"""Could the GPU copy part of a cached file straight from its page-cache pages while our staged
load reads the rest? (GPU machine; `bash bench/on_device.sh hybrid`.)

From the page cache a staged load moves every byte through host memory three times (read from
the cache, written to a staging buffer, read by the GPU's DMA), and on the H100 hosts host
memory is what holds it below the link (docs/benchmarks.md). Page-cache pages registered with
`cuMemHostRegister` are read once, by the DMA, but registering runs at ~40 GB/s, so alone that
path loses (docs/benchmarks.md, "What decided the defaults"). This asks whether the two together
move more bytes per second than the staged load alone:

  staged      our loader: TensorDeserializer(p, device="cuda:0") of a --gib GiB `.tensors` file
  registered  a plain cached file mapped, each 64 MiB piece page-locked (READ_ONLY), copied to one
              device buffer on the thread's own stream, unlocked; --threads threads taking the
              next piece
  both        the two at once in one process: (bytes of both) / (time until both are done)

Each measurement is a fresh process (CUDA context and imports before the clock); --rounds
interleaved rounds; prints a table and writes hybrid-probe.json under --out.

    python3 bench/hybrid_probe.py --dir /tmp/tzhybrid --gib 6 --reg-gib 3 --out $OUT
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import subprocess
import sys
import threading
import time

MiB, GiB = 1 << 20, 1 << 30
PIECE = 64 * MiB
HERE = os.path.dirname(os.path.abspath(__file__))


def write_files(d: str, gib: float, reg_gib: float) -> tuple[str, str]:
    import torch
    from tensorizer_rs import TensorSerializer

    os.makedirs(d, exist_ok=True)
    tpath, rpath = os.path.join(d, "staged.tensors"), os.path.join(d, "registered.bin")
    per = 256 * MiB
    sd = {f"w{i}": torch.full((per // 2,), i, dtype=torch.bfloat16) for i in range(int(gib * 4))}
    with TensorSerializer(tpath) as s:
        s.write_state_dict(sd)
    block = os.urandom(PIECE)
    with open(rpath, "wb") as f:
        f.writelines(block for _ in range(int(reg_gib * GiB) // PIECE))
    os.sync()
    for p in (tpath, rpath):  # read back through the page cache
        with open(p, "rb") as f:
            while f.read(PIECE):
                pass
    return tpath, rpath


def child(mode: str, tpath: str, rpath: str, reg_bytes: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, HERE)
    from cuda_ctypes import cuda, libc, ok

    torch.empty(1, device="cuda:0")
    torch.cuda.synchronize()
    ctx = ctypes.c_void_p()
    ok(cuda.cuCtxGetCurrent(ctypes.byref(ctx)), "current context")
    cuda.cuMemcpyHtoDAsync_v2.argtypes = [
        ctypes.c_uint64,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
    ]
    cuda.cuStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
    cuda.cuStreamSynchronize.argtypes = [ctypes.c_void_p]

    out: dict = {"mode": mode}
    reg_setup = None
    if mode in ("registered", "both"):
        fd = os.open(rpath, os.O_RDONLY)
        base = libc.mmap(None, reg_bytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if base is None or base == ctypes.c_void_p(-1).value:
            raise OSError(ctypes.get_errno(), "mmap")
        dst = torch.empty(reg_bytes, dtype=torch.uint8, device="cuda:0")
        streams = []
        for _ in range(threads):
            s = ctypes.c_void_p()
            ok(cuda.cuStreamCreate(ctypes.byref(s), 1), "stream")  # non-blocking
            streams.append(s)
        reg_setup = (fd, base, dst, streams)

    def registered() -> None:
        _fd, base, dst, streams = reg_setup
        left = list(range(0, reg_bytes, PIECE))[::-1]
        lock = threading.Lock()
        errors = []

        def work(stream):
            try:
                ok(cuda.cuCtxSetCurrent(ctx), "set current")
                while True:
                    with lock:
                        if not left:
                            return
                        off = left.pop()
                    n = min(PIECE, reg_bytes - off)
                    ok(cuda.cuMemHostRegister_v2(base + off, n, 0x08), "register")  # READ_ONLY
                    ok(
                        cuda.cuMemcpyHtoDAsync_v2(dst.data_ptr() + off, base + off, n, stream),
                        "copy",
                    )
                    ok(cuda.cuStreamSynchronize(stream), "sync")
                    ok(cuda.cuMemHostUnregister(base + off), "unregister")
            except Exception as e:  # noqa: BLE001  (reported, not raised, from a thread)
                errors.append(repr(e))

        ts = [threading.Thread(target=work, args=(s,)) for s in streams]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if errors:
            raise RuntimeError(errors[0])
        out["registered_end"] = time.perf_counter()

    def staged() -> None:
        from tensorizer_rs import TensorDeserializer

        d = TensorDeserializer(tpath, device="cuda:0")
        out["staged_bytes"] = sum(d[k].numel() * d[k].element_size() for k in d)
        torch.cuda.synchronize()
        out["staged_end"] = time.perf_counter()

    t0 = time.perf_counter()
    if mode == "staged":
        staged()
    elif mode == "registered":
        registered()
    else:
        failed = []

        def background():
            try:
                registered()
            except Exception as e:  # noqa: BLE001  (raised below, on this thread)
                failed.append(e)

        th = threading.Thread(target=background)
        th.start()
        staged()
        th.join()
        if failed:
            raise failed[0]
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    nbytes = out.get("staged_bytes", 0) + (reg_bytes if reg_setup else 0)
    out.update(seconds=wall, bytes=nbytes, gbps=nbytes / wall / 1e9)
    for k in ("staged_end", "registered_end"):
        if k in out:
            out[k.replace("_end", "_seconds")] = out.pop(k) - t0
    if reg_setup:
        fd, base, _dst, _s = reg_setup
        libc.munmap(base, reg_bytes)
        os.close(fd)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--gib", type=float, default=6.0, help="the staged .tensors file")
    ap.add_argument("--reg-gib", type=float, default=3.0, help="the registered file")
    ap.add_argument("--threads", type=int, default=4, help="registering threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, tpath, rpath, reg, threads = a.child
        print(json.dumps(child(mode, tpath, rpath, int(reg), int(threads))))
        return
    t0 = time.perf_counter()
    tpath, rpath = write_files(a.dir, a.gib, a.reg_gib)
    print(f"[{time.perf_counter() - t0:5.1f} s] files written and cached", flush=True)
    full = int(a.reg_gib * GiB) // PIECE * PIECE
    half = full // 2 // PIECE * PIECE
    arms = [("staged", 0), ("registered", full), ("both", half), ("both", full)]
    runs = []
    try:
        for rnd in range(a.rounds):
            k = rnd % len(arms)
            for mode, reg in arms[k:] + arms[:k]:  # no arm always first
                cmd = [sys.executable, __file__, "--dir", a.dir, "--child"]
                cmd += [mode, tpath, rpath, str(reg), str(a.threads)]
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
                try:
                    r = json.loads(p.stdout.strip().splitlines()[-1])
                except (IndexError, ValueError):
                    r = {"mode": mode, "error": p.stderr[-600:]}
                r.update(round=rnd, reg_bytes=reg)
                runs.append(r)
                print(f"[{time.perf_counter() - t0:5.1f} s] {json.dumps(r)}", flush=True)
    finally:
        for p in (tpath, rpath):
            os.unlink(p)
    print("\n| arm | GB/s by round | staged part s | registered part s |")
    print("| --- | --- | --- | --- |")
    for mode, reg in arms:
        rs = [r for r in runs if r["mode"] == mode and r["reg_bytes"] == reg and "gbps" in r]
        label = mode if not reg else f"{mode}, {reg / GiB:.1f} GiB registered"

        def col(key, fmt, rs=rs):
            return " / ".join(format(r.get(key, 0), fmt) for r in rs)

        print(
            f"| {label} | {col('gbps', '.2f')} | {col('staged_seconds', '.3f')} | "
            f"{col('registered_seconds', '.3f')} |"
        )
    with open(os.path.join(a.out, "hybrid-probe.json"), "w") as f:
        json.dump({"gib": a.gib, "reg_gib": a.reg_gib, "threads": a.threads, "runs": runs}, f)


if __name__ == "__main__":
    main()
