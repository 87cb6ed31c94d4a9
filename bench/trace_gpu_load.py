"""Where a load into existing CUDA tensors spends its time, from the loader's own timeline.

Loads a .tensors file into a module already on the GPU (the `load_into_module` path), a few
times in one process, with TENSORIZER_RS_TRACE=1, and prints per load: GB/s, when the readers
started and ended, how long readers waited for a staging buffer's copy (`staging_sync`) against
how long they read (`read`), and per 10 ms the bytes read, each reader's read speed and the
readers' waits for a buffer (which side slowed in a slow stretch), all from the constructor's call
(the first load of the process also shows its staging buffers being made). Readers that wait a large share of
the time mean the host->device copies are the bound; a slow first or last 10 ms means a ramp or
a tail.

    python3 bench/trace_gpu_load.py /tmp/tzgpu/model.tensors [--rounds 3]

With `--fresh new` (or `module`) each load runs in a fresh process timed as
bench/gpu_bench.py times it (import, constructor, first access or load_into_module, sync), and
the Python-side steps are printed beside the loader's marks: where a fresh process's fixed
cost goes. `--cold` drops the page cache before each of those loads (a cold load's timeline),
and `--c-reader .device/bin/direct_reader` reads the cold file with C threads after each one
(16 x 512 KiB O_DIRECT, bench/direct_reader.c): the disk's pace beside the load's.

With no file there, writes one first (`--gib`, the Llama-shaped model of bench/gpu_bench.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ["TENSORIZER_RS_TRACE"] = "1"  # read once per process, before the first mark
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lib import drop_caches  # found on the path above

GiB = 1 << 30


def cached_file(path, gib):
    """Write the model to `path` unless it is there, and read it into the page cache."""
    import gpu_bench
    import torch
    from tensorizer_rs import TensorSerializer

    if not os.path.exists(path):
        shapes, _ = gpu_bench.llama_shapes(int(gib * GiB))
        m = gpu_bench.build_module(shapes, "cuda", torch.bfloat16)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        s = TensorSerializer(path)
        s.write_module(m)
        s.close()
        del m
    gpu_bench.parallel_read(path)


def model_for(path):
    """A module on the GPU shaped as the file's tensors (their memory uninitialized)."""
    import gpu_bench
    import torch

    shapes = gpu_bench.file_shapes(path)
    return gpu_bench.build_module(shapes, "meta", torch.bfloat16).to_empty(device="cuda")


def summarize(events, seconds, nbytes, start):
    """`start`: the constructor's call, on the trace's clock (CLOCK_MONOTONIC)."""
    by = collections.defaultdict(list)
    for t, thread, what, a, b in events:
        by[what].append((t, thread, a, b))
    print(f"  {nbytes / seconds / 1e9:.2f} GB/s, {seconds * 1e3:.1f} ms wall")
    marks = ("ctor_prewarm", "prewarm_engine", "ctor_opened", "ctor_indexed", "staging_made")
    marks += ("alloc_start", "alloc_end", "native_call", "load_enter")
    marks += ("load_engine", "load_planned", "load_start")
    for what in marks + ("reader_start", "reader_end", "readers_done", "load_end"):
        ts = [t for t, *_ in by.get(what, [])]
        if ts:
            print(
                f"  {what:13s} {(min(ts) - start) / 1e6:7.2f} .. {(max(ts) - start) / 1e6:7.2f} ms"
                + (f" ({len(ts)})" if len(ts) > 1 else "")
            )
    per = collections.defaultdict(lambda: [0, 0])
    for _, thread, a, _ in by.get("staging_sync", []):
        per[thread][0] += a
    for _, thread, a, _ in by.get("read", []):
        per[thread][1] += a
    if per:
        waits = sum(v[0] for v in per.values()) / len(per) / 1e6
        reads = sum(v[1] for v in per.values()) / len(per) / 1e6
        print(f"  per reader: waiting for a buffer {waits:.0f} ms, reading {reads:.0f} ms")
    buckets = collections.Counter()
    for t, _, _, n in by.get("read", []):
        buckets[(t - start) // 10_000_000] += n
    if buckets:
        rates = " ".join(f"{buckets[k] / 1e7:.0f}" for k in range(max(buckets) + 1))
        print(f"  GB/s read per 10 ms: {rates}")
        # Which side slows in a dip: a reader's own read speed (the host: page cache, memory,
        # CPU) or the readers' time waiting for copies to free a buffer (the link).
        busy, waited = collections.Counter(), collections.Counter()
        for t, _, a, _ in by.get("read", []):
            busy[(t - start) // 10_000_000] += a
        for t, _, a, _ in by.get("staging_sync", []) + by.get("staging_wait", []):
            waited[(t - start) // 10_000_000] += a
        span = range(max(buckets) + 1)
        speed = " ".join(f"{buckets[k] / busy[k]:.1f}" if busy[k] else "-" for k in span)
        print(f"  GB/s per reader while reading, per 10 ms: {speed}")
        idle = " ".join(f"{waited[k] / 1e6:.0f}" for k in span)
        print(f"  ms waiting for a buffer (all readers), per 10 ms: {idle}")


def fresh_child(path, into_module):
    """One load in this (fresh) process, timed as bench/gpu_bench.py times it: from before
    tensorizer_rs is imported to the device's last copy; prints the Python-side steps too."""
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    model = model_for(path) if into_module else None
    torch.cuda.synchronize()
    steps = []
    t0, start = time.perf_counter(), time.monotonic_ns()
    from tensorizer_rs import TensorDeserializer, _native

    steps.append(("imported", time.monotonic_ns()))
    d = TensorDeserializer(path, device="cuda")
    steps.append(("constructed", time.monotonic_ns()))
    if model is not None:
        d.load_into_module(model)
    else:
        next(iter(d.values()))
    steps.append(("loaded", time.monotonic_ns()))
    torch.cuda.synchronize()
    steps.append(("synced", time.monotonic_ns()))
    seconds = time.perf_counter() - t0
    print("  " + ", ".join(f"{what} {(t - start) / 1e6:.2f}" for what, t in steps) + " ms")
    summarize(_native.trace_take(), seconds, os.path.getsize(path), start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--fresh",
        choices=("new", "module"),
        help="each load in a fresh process, timed as gpu_bench times it: new tensors "
        "(first access) or in place (load_into_module)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--c-reader", help="with --cold: C O_DIRECT reader to run after each load")
    ap.add_argument("--gib", type=float, default=16)
    ap.add_argument(
        "--cold",
        action="store_true",
        help="with --fresh: drop the page cache before each load (root), so the readers' "
        "timeline is a cold load's",
    )
    ap.add_argument(
        "--readers", default="", help="comma-separated num_readers to run in turn (default: ours)"
    )
    args = ap.parse_args()
    if args.child:
        return fresh_child(args.path, args.fresh == "module")
    if args.fresh:
        import subprocess

        cached_file(args.path, args.gib)
        for k in range(args.rounds):
            if args.cold:
                drop_caches()
            cold = ", cold" if args.cold else ""
            print(f"load {k}, fresh process, {args.fresh}{cold}:", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), args.path, "--fresh", args.fresh]
            subprocess.run(cmd + ["--child"], check=True)
            if args.cold and args.c_reader:
                drop_caches()
                c = [args.c_reader, args.path, "16", str(512 << 10), "0", "huge"]
                out = subprocess.run(c, check=True, capture_output=True, text=True).stdout.strip()
                print(f"  C threads 16 x 512 KiB O_DIRECT, cold: {out}", flush=True)
        return
    import torch
    from tensorizer_rs import TensorDeserializer, _native

    cached_file(args.path, args.gib)
    model = model_for(args.path)
    nbytes = os.path.getsize(args.path)
    counts = [int(n) for n in args.readers.split(",") if n] or [None]
    for k, n in ((k, n) for n in counts for k in range(args.rounds)):
        kw = {"num_readers": n} if n else {}
        _native.trace_take()
        torch.cuda.synchronize()
        t0, start = time.perf_counter(), time.monotonic_ns()
        d = TensorDeserializer(args.path, device="cuda", **kw)
        d.load_into_module(model)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        d.close()
        print(f"load {k}" + (f", num_readers={n}" if n else "") + ":")
        summarize(_native.trace_take(), seconds, nbytes, start)


if __name__ == "__main__":
    main()
