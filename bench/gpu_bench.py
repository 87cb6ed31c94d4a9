#!/usr/bin/env python3
"""GPU load benchmark, one command on the GPU machine (results: docs/benchmarks.md).

    python3 bench/gpu_bench.py --dir /path/on/local/disk [--out DIR] [--gib 16]
    python3 bench/gpu_bench.py --dir ... --wheels before=SITE after=SITE [--nginx BIN]
    python3 bench/gpu_bench.py --dir ... --encrypted [--nginx BIN] [--gib 16] [--rounds 3]
    python3 bench/gpu_bench.py --dir /tmp/x --out /tmp/o --encrypted --dry-run   # CPU, tiny

The third form is issue 27's plaintext against encrypted (see encrypted_vs_plain): new tensors
and in place, warm, over HTTP (with --nginx) and cold, each load a fresh process with its bytes
checked after the clock; per row the encrypted/plaintext ratio and RssAnon growth last.

The second form is the same-run A/B of two builds (each installed into its own folder; every
load a fresh process whose PYTHONPATH names it): local warm loads into new tensors, in place and
the vLLM loader's path, an encrypted file, HTTP to CUDA (with --nginx), cold loads; rounds
interleaved, their order alternating; a comparison table last, ab.json under --out.

1. Limits: pinned host→device bandwidth (torch), page cache → host and → pinned read bandwidth,
   the two together (host→device copies beside 8 / 12 / 16 threads reading page cache into
   pinned buffers: the "staged cap", what a loader staging through pinned memory can reach on
   this host) and cold O_DIRECT disk bandwidth (16 threads, 64 MiB chunks).
2. Writes a synthetic Llama-8B-shaped bf16 model (random data, >= --gib GiB) with our writer, the
   same tensors as safetensors, and a file of 20,000 small tensors.
3. Loads each to the GPU, warm (page cache) and cold (caches dropped), each in a fresh process:
   ours (TensorDeserializer(device="cuda") and load_into_module into a model already on the GPU),
   CoreWeave tensorizer 2.12.1 (if importable, --coreweave PATH), safetensors. Reports GB/s, the
   ratio to the limit (warm: pinned H2D, and the staged cap; cold: O_DIRECT disk), peak RssAnon
   growth and GPU memory growth; a sweep of our settings (warm); and per-tensor overhead on the small file.

Writes bench.json and bench.log under --out; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

GiB = 1 << 30
MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_lib import build_module, drop_caches, file_shapes  # shared with every benchmark


# ------------------------------------------------------------------------------ helpers
def log(*a):
    print(*a, flush=True)


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples RssAnon every 2 ms in a thread; ``peak`` is the highest value seen."""

    def __init__(self):
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.002)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon())


def llama_shapes(min_bytes: int):
    """Llama-3-8B tensor names and shapes (bf16), with layers added until >= min_bytes."""
    hidden, inter, kv, vocab = 4096, 14336, 1024, 128256
    per_layer = [
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (kv, hidden)),
        ("self_attn.v_proj.weight", (kv, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
        ("input_layernorm.weight", (hidden,)),
        ("post_attention_layernorm.weight", (hidden,)),
    ]

    def numel(s):
        n = 1
        for d in s:
            n *= d
        return n

    fixed = [
        ("model.embed_tokens.weight", (vocab, hidden)),
        ("model.norm.weight", (hidden,)),
        ("lm_head.weight", (vocab, hidden)),
    ]
    layer_bytes = 2 * sum(numel(s) for _, s in per_layer)
    total = 2 * sum(numel(s) for _, s in fixed)
    layers = 1
    while total + layers * layer_bytes < min_bytes:
        layers += 1
    out = [fixed[0]]
    for i in range(layers):
        out += [(f"model.layers.{i}.{n}", s) for n, s in per_layer]
    out += fixed[1:]
    return out, layers


# ------------------------------------------------------------------------------ limits
def measure_h2d():
    import torch

    n = 4 * GiB
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    src.fill_(7)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    one = n / statistics.median(times) / 1e9
    # 64 MiB chunks over 4 streams.
    streams = [torch.cuda.Stream() for _ in range(4)]
    chunk = 64 * MiB
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(n // chunk):
        with torch.cuda.stream(streams[k % 4]):
            dst[k * chunk : (k + 1) * chunk].copy_(
                src[k * chunk : (k + 1) * chunk], non_blocking=True
            )
    torch.cuda.synchronize()
    chunked = n / (time.perf_counter() - t0) / 1e9
    # The loader's pattern: 8 MiB copies over 1 and 4 streams.
    small = {}
    for ns in (1, 4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(n // (8 * MiB)):
            with torch.cuda.stream(streams[k % ns]):
                dst[k * 8 * MiB : (k + 1) * 8 * MiB].copy_(
                    src[k * 8 * MiB : (k + 1) * 8 * MiB], non_blocking=True
                )
        torch.cuda.synchronize()
        small[f"pinned_h2d_8MiB_{ns}streams_gbps"] = n / (time.perf_counter() - t0) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return {"pinned_h2d_gbps": one, "pinned_h2d_64MiB_4streams_gbps": chunked, **small}


def parallel_read(
    path, threads=16, chunk=64 * MiB, direct=False, limit=None, pinned=False, until=None
):
    """GB/s of `threads` threads reading the file in `chunk` pieces with preadv, into anonymous
    memory or (pinned=True) into page-locked buffers from cudaHostAlloc, as a loader stages.
    Once through the file, or round and round it until the event `until` is set."""
    import mmap

    size = os.path.getsize(path)
    if limit:
        size = min(size, limit)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    offsets = list(range(0, size, chunk))
    lock = threading.Lock()
    done = [0]

    def work():
        if pinned:
            import torch

            buf = memoryview(torch.empty(chunk, dtype=torch.uint8, pin_memory=True).numpy())
        else:
            buf = memoryview(mmap.mmap(-1, chunk))  # page-aligned, as O_DIRECT needs
        try:
            os.preadv(fd, [buf[: min(4096, chunk)]], 0)  # first touch before the clock starts
        finally:
            ready.wait()  # never leave the others waiting
        while True:
            with lock:
                if until is not None:
                    if until.is_set():
                        return
                    off = offsets[0]
                    offsets[0] = (off + chunk) % max(size - chunk, 1)
                elif not offsets:
                    return
                else:
                    off = offsets.pop(0)
            n = os.preadv(fd, [buf], off)
            with lock:
                done[0] += n

    ready = threading.Barrier(threads + 1)
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    dt = time.perf_counter() - t0
    os.close(fd)
    return done[0] / dt / 1e9


def staged_limits(path, secs=1.0):
    """What a staged loader can reach at best on this host: host->device DMA (4 GiB pinned
    copies, back to back) and page cache -> pinned reads (k threads, 8 MiB buffers each) run at
    the same time, since the loader needs both at once and they share the host's memory. For
    each k the pair of rates; "cap" is the best over k of the slower of the two (reads paced to
    the DMA could do a little better than this, a loader with any overhead worse)."""
    import torch

    src = torch.empty(4 * GiB, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(4 * GiB, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()

    def dma(stop, out):
        n, t0 = 0, time.perf_counter()
        while not stop.is_set():
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            n += src.numel()
        out.append(n / (time.perf_counter() - t0) / 1e9)

    def reads(k, stop, out):
        out.append(parallel_read(path, threads=k, chunk=8 * MiB, pinned=True, until=stop))

    res = {}
    try:
        for k in (8, 12, 16):
            stop, d, r = threading.Event(), [], []
            ts = [
                threading.Thread(target=dma, args=(stop, d)),
                threading.Thread(target=reads, args=(k, stop, r)),
            ]
            for t in ts:
                t.start()
            time.sleep(secs)
            stop.set()
            for t in ts:
                t.join()
            res[f"{k}_readers"] = {"h2d_gbps": d[0], "reads_gbps": r[0]}
    finally:
        src = dst = None  # frees the 4 GiB on both sides
        torch.cuda.empty_cache()
    res["cap_gbps"] = max(min(v.values()) for v in res.values())
    return res


# ------------------------------------------------------------------------------ writing
def write_small(args, res):
    """The many-small-tensors file (per-tensor overhead), written by our writer."""
    import torch
    from tensorizer_rs import TensorSerializer

    small = os.path.join(args.dir, "small.tensors")
    gen = torch.Generator().manual_seed(1)
    sd = {
        f"t{k}": torch.randn(64 + (k % 7) * 32, generator=gen).to(torch.bfloat16)
        for k in range(args.small)
    }
    s = TensorSerializer(small)
    s.write_state_dict(sd)
    s.close()
    res["small"] = {"tensors": len(sd), "bytes": sum(v.nbytes for v in sd.values())}
    return small


def write_files(args, res):
    import torch
    from tensorizer_rs import TensorSerializer

    shapes, layers = llama_shapes(int(args.gib * GiB))
    res["model"] = {"layers": layers, "tensors": len(shapes)}
    ours = os.path.join(args.dir, "model.tensors")
    st = os.path.join(args.dir, "model.safetensors")
    g = torch.Generator(device="cuda").manual_seed(0)
    m = build_module(shapes, "cuda", torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(generator=g)
    nbytes = sum(p.nbytes for p in m.parameters())
    res["model"]["bytes"] = nbytes
    t0 = time.perf_counter()
    s = TensorSerializer(ours)
    s.write_module(m)
    s.close()
    res["model"]["write_ours_s"] = time.perf_counter() - t0
    log(
        f"wrote {ours}: {nbytes / GiB:.2f} GiB, {len(shapes)} tensors, {time.perf_counter() - t0:.1f} s"
    )
    if args.skip_safetensors:
        st = None
    else:
        free = shutil.disk_usage(args.dir).free
        if free > nbytes + 4 * GiB:
            from safetensors.torch import save_file

            t0 = time.perf_counter()
            sd = {k: v.detach().cpu() for k, v in m.state_dict().items()}
            save_file(sd, st)
            del sd
            res["model"]["write_safetensors_s"] = time.perf_counter() - t0
            log(f"wrote {st} in {time.perf_counter() - t0:.1f} s")
        else:
            log(f"skip safetensors: {free / GiB:.1f} GiB free")
            st = None
    del m
    torch.cuda.empty_cache()
    small = write_small(args, res)
    return ours, st, small


# ------------------------------------------------------------------------------ one load (child)
def child(args):
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    spec = json.loads(args.child)
    kind, path = spec["loader"], spec["path"]
    out = {"loader": kind, "cold": spec.get("cold", False)}
    model = None
    if kind in ("ours_module", "encrypted_module", "sweep"):
        model = build_module(file_shapes(path), "meta", torch.bfloat16).to_empty(device="cuda")
    if kind == "vllm_path":
        # What our vLLM loader does for a vLLM-tensorized file, minus vLLM itself: the model is
        # built on the GPU (vLLM's initialize_model under torch.device), then filled from the
        # file in place (tensors that do not fit are released to meta and replaced first;
        # "release_all" releases every one, as before commit 57ae1ff).
        from tensorizer_rs import _cuda

        if os.environ.get("BENCH_LATE_PREWARM") != "1":  # A/B: before 2026-11-28's change
            # The loader page-locks the staging buffers before vLLM builds the model.
            _cuda.prewarm_for(torch.device("cuda", 0), path, None)
        shapes = file_shapes(path)
        model = build_module(shapes, "cuda", torch.bfloat16)
        torch.cuda.synchronize()
    if kind == "sweep":
        return sweep(model, path, out)
    if kind == "small":
        return small_overhead(path, out, spec)
    if spec.get("cold"):
        drop_caches()
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    alloc0 = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rss0 = rss_anon()
    counters0 = None
    with PeakRss() as peak:
        t0 = time.perf_counter()
        if kind in ("ours", "ours_module", "encrypted", "encrypted_module"):
            from tensorizer_rs import DecryptionParams, TensorDeserializer, _cuda

            counters0 = _cuda.counters()
            kw = {}
            if kind.startswith("encrypted"):
                kw["encryption"] = DecryptionParams.from_key(bytes.fromhex(spec["key"]))
            d = TensorDeserializer(path, device="cuda", **kw)
            if model is not None:
                d.load_into_module(model)
            else:
                next(iter(d.values()))  # the eager load runs at first access
            keep = d
        elif kind == "vllm_path":
            from tensorizer_rs.vllm.fill import fill_module, release_file_tensors

            names = frozenset(n for n, _ in shapes)
            if spec.get("release_all"):
                release_file_tensors(model, names)
                names = None
            _, secs = fill_module(model, path, "cuda", torch.bfloat16, {}, release=names)
            out["fill_seconds"] = secs
            keep = model
        elif kind == "coreweave":
            from tensorizer import TensorDeserializer as CW

            keep = CW(path, device="cuda:0", num_readers=spec.get("num_readers"))
        elif kind == "safetensors":
            from safetensors.torch import load_file

            keep = load_file(path, device="cuda:0")
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    size = spec.get("bytes") or os.path.getsize(path)
    out.update(
        seconds=dt,
        file_bytes=size,
        gbps=size / dt / 1e9,
        rss_anon_growth=peak.peak - rss0,
        gpu_alloc_growth=torch.cuda.memory_allocated() - alloc0,
        gpu_driver_growth=free0 - torch.cuda.mem_get_info()[0],
    )
    if counters0 is not None:
        from tensorizer_rs import _cuda

        c = _cuda.counters()
        out["counters"] = {k: c[k] - counters0.get(k, 0) for k in c}
        out["staging_pool_bytes"] = _cuda.staging()[0]
        # TensorDeserializer.cuda_load_stats: absent in wheels from before it (then None).
        stats = getattr(keep, "cuda_load_stats", None)
        out["load_stats"] = stats and stats["loads"]
        out["alloc_seconds"] = stats and stats["alloc_seconds"]
    del keep
    return out


def sweep(model, path, out):
    """Warm, in place, many settings (the file is in the page cache)."""
    import torch
    from tensorizer_rs import TensorDeserializer, _cuda

    size = os.path.getsize(path)
    default_pinned = _cuda.staging()[3]
    configs = [
        ("default", {}, None, None),
        ("readers=8", {}, None, 8),
        ("readers=16", {}, None, 16),
        ("chunk=16M/256M", {}, (256 * MiB, 16 * MiB), None),
        ("driver-pinned", {}, (256 * MiB, 8 * MiB, "driver"), None),
        ("io=buffered", {"io": "buffered"}, None, None),
        ("default(again)", {}, None, None),
    ]
    rows = []
    for name, opts, staging, readers in configs:
        _cuda.IO_MODE = opts.get("io")
        _cuda.staging(*(staging or (256 * MiB, 8 * MiB, default_pinned)))
        runs = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            TensorDeserializer(
                path, device="cuda", num_readers=readers, lazy_load=True
            ).load_into_module(model)
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        rows.append({"config": name, "gbps": [size / t / 1e9 for t in runs]})
        log(f"  sweep {name:16s} " + " ".join(f"{size / t / 1e9:6.2f}" for t in runs) + " GB/s")
    _cuda.IO_MODE = None
    _cuda.staging(256 * MiB, 8 * MiB, default_pinned)
    out["sweep"] = rows
    return out


def small_overhead(path, out, spec):
    import torch
    from tensorizer_rs import TensorDeserializer, _cuda

    n = spec["tensors"]

    def timed(device, share=True):
        _cuda.SHARE_MAX_BYTES = (64 << 10) if share else 0
        total, ctor, native = [], [], []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            d = TensorDeserializer(path, device=device)
            t1 = time.perf_counter()
            next(iter(d.values()))
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            total.append(t2 - t0)
            ctor.append(t1 - t0)
            stats = getattr(d, "cuda_load_stats", {}).get("loads")
            native.append(stats[0]["seconds"] if stats else 0.0)
            del d
        us = lambda xs: statistics.median(xs) / n * 1e6
        return {"total": us(total), "constructor": us(ctor), "native": us(native)}

    out["us_per_tensor_cuda"] = timed("cuda")
    out["us_per_tensor_cuda_no_sharing"] = timed("cuda", share=False)
    out["us_per_tensor_cpu"] = timed("cpu")
    try:
        from tensorizer import TensorDeserializer as CW

        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            CW(path, device="cuda:0")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out["us_per_tensor_coreweave_cuda"] = statistics.median(times) / n * 1e6
    except Exception as e:  # noqa: BLE001
        out["coreweave_error"] = repr(e)
    return out


def run_child(args, spec, timeout=240):
    env = dict(os.environ)
    env.update(spec.get("env", {}))
    if spec["loader"] in ("coreweave", "small") and args.coreweave:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), args.coreweave]))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"loader": spec["loader"], "cold": spec.get("cold", False), "error": "timeout"}
    with open(os.path.join(args.out, "bench.log"), "a") as f:
        f.write(f"=== {spec} ({time.perf_counter() - t0:.1f} s)\n{p.stdout}\n{p.stderr[-20000:]}\n")
    for line in p.stdout.splitlines():
        if line.startswith("  sweep"):
            log(line)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"loader": spec["loader"], "cold": spec.get("cold", False), "error": p.stderr[-3000:]}


# ------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=".")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--gib", type=float, default=None, help="model size (16; --dry-run: 0.03)")
    ap.add_argument("--small", type=int, default=20000)
    ap.add_argument("--coreweave", default=None, help="a directory holding CoreWeave's tensorizer")
    ap.add_argument("--skip-safetensors", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument(
        "--small-only",
        action="store_true",
        help="only the many-small-tensors case, three rounds (with --ab-env: with and without)",
    )
    ap.add_argument(
        "--wheels",
        nargs="+",
        default=None,
        metavar="NAME=SITE",
        help="same-run A/B of builds installed into SITE folders (see the docstring)",
    )
    ap.add_argument(
        "--encrypted",
        action="store_true",
        help="plaintext against encrypted (GPU decryption; host decryption for reference), new "
        "tensors and in place: warm, over HTTP (with --nginx) and cold (unless --skip-cold), "
        "--rounds interleaved rounds of fresh processes, each load's bytes checked",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="--encrypted on the CPU with a tiny model, files evicted with posix_fadvise (CI)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=500.0,
        help="--encrypted: seconds; loads that would pass it are skipped, so the summary prints",
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="warm rounds of --wheels / --encrypted (cold: 2)"
    )
    ap.add_argument(
        "--nginx", default=None, help="nginx binary: --wheels / --encrypted also load over HTTP"
    )
    ap.add_argument(
        "--ab-env",
        default=None,
        help='warm A/B of an environment, e.g. \'{"TENSORIZER_RS_STAGING_BYTES": "134217728"}\' '
        "(or a list of them): the --ab-loaders loads without and with each, interleaved, "
        "three rounds",
    )
    ap.add_argument(
        "--ab-loaders",
        default="ours,ours_module",
        help="the loads of an --ab-env round (ours, ours_module, vllm_path)",
    )
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.dry_run and not args.encrypted:
        ap.error("--dry-run runs only with --encrypted")
    if args.gib is None:
        args.gib = 0.03 if args.dry_run else 16.0
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    os.makedirs(args.dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    import torch

    res = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save():
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(res, f, indent=1)

    res["gpu"] = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    res["torch"] = torch.__version__
    res["cpus"] = os.cpu_count()
    try:
        res["commit"] = subprocess.run(
            ["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip() or os.environ.get("BENCH_COMMIT", "")
    except OSError:
        res["commit"] = os.environ.get("BENCH_COMMIT", "")
    res["commit"] = os.environ.get("BENCH_COMMIT", res["commit"])
    log(f"GPU {res['gpu']}, torch {res['torch']}, {res['cpus']} CPUs, commit {res['commit']}")
    if args.small_only:
        small = write_small(args, res)
        env = json.loads(args.ab_env) if args.ab_env else None
        res["small_rounds"] = []
        for k in range(3):
            for tag, extra in [("", {})] + ([(f" {args.ab_env}", {"env": env})] if env else []):
                r = run_child(
                    args, {"loader": "small", "path": small, "tensors": args.small, **extra}
                )
                r["label"] = f"small{tag} #{k}"
                res["small_rounds"].append(r)
                log(f"{r['label']}: {r.get('us_per_tensor_cuda', r.get('error'))}")
                save()
        return
    if args.wheels:
        return wheels_ab(args, res, save)
    if args.encrypted:
        return encrypted_vs_plain(args, res, save)
    res["limits"] = measure_h2d()
    log(f"pinned H2D: {res['limits']}")
    ours, st, small = write_files(args, res)
    res["limits"]["page_cache_read_16t_gbps"] = parallel_read(ours, direct=False)
    # Page cache -> page-locked memory, the loader's first hop: best of a few shapes.
    pinned = {}
    for threads, chunk in ((16, 2 * MiB), (16, 4 * MiB), (16, 8 * MiB), (16, 64 * MiB)):
        pinned[f"{threads}x{chunk // MiB}MiB"] = parallel_read(
            ours, threads=threads, chunk=chunk, pinned=True
        )
    res["limits"]["page_cache_to_pinned"] = pinned
    res["limits"]["page_cache_to_pinned_gbps"] = max(pinned.values())
    log(f"page cache -> pinned: {pinned}")
    res["limits"]["staged"] = staged_limits(ours)
    log(f"pinned H2D beside page cache -> pinned reads: {res['limits']['staged']}")
    save()
    warm_files = [ours] + ([st] if st else [])

    def warm():
        for f in warm_files:
            parallel_read(f, direct=False)

    runs = res["runs"] = []
    warm()
    plan = [
        {"loader": "ours", "path": ours},
        {"loader": "ours_module", "path": ours},
        {"loader": "ours", "path": ours, "label": "ours(again)"},
        {"loader": "ours_module", "path": ours, "label": "ours_module(again)"},
        {"loader": "vllm_path", "path": ours},
        {"loader": "vllm_path", "path": ours, "label": "vllm_path(again)"},
        {"loader": "ours", "path": ours, "label": "ours(3rd)"},
    ]
    if args.ab_env:
        envs = json.loads(args.ab_env)
        variants = [({}, "")] + [
            ({"env": e}, " " + json.dumps(e)) for e in (envs if isinstance(envs, list) else [envs])
        ]
        # Odd rounds run the variants in reverse, so no variant always goes first.
        plan = [
            {"loader": loader, "path": ours, **extra, "label": loader + tag + f" #{k}"}
            for k in range(3)
            for loader in args.ab_loaders.split(",")
            for extra, tag in (variants[::-1] if k % 2 else variants)
        ]
    if args.coreweave and not args.ab_env:
        plan.append({"loader": "coreweave", "path": ours})
        plan.append(
            {
                "loader": "coreweave",
                "path": ours,
                "num_readers": 16,
                "label": "coreweave(readers=16)",
            }
        )
    if st:
        plan.append({"loader": "safetensors", "path": st})
    for spec in plan:
        r = run_child(args, spec)
        r["label"] = spec.get("label", spec["loader"])
        runs.append(r)
        log(f"warm {r}")
        save()
    if not args.skip_sweep:
        res["sweep"] = run_child(args, {"loader": "sweep", "path": ours}).get("sweep")
        save()
    if not args.skip_small:
        res["small"].update(
            run_child(args, {"loader": "small", "path": small, "tensors": args.small})
        )
        save()
    if not args.skip_cold:
        drop_caches()
        res["limits"]["odirect_read_16t_64MiB_before_gbps"] = parallel_read(
            ours, direct=True, limit=8 * GiB
        )
        drop_caches()
        res["limits"]["odirect_read_16t_8MiB_before_gbps"] = parallel_read(
            ours, direct=True, chunk=8 * MiB, limit=8 * GiB
        )
        log(f"limits: {res['limits']}")
        cold = [{"loader": "ours", "path": ours}, {"loader": "ours_module", "path": ours}]
        if args.coreweave:
            cold.append({"loader": "coreweave", "path": ours})
        if st:
            cold.append({"loader": "safetensors", "path": st})
        for spec in cold:
            r = run_child(args, {**spec, "cold": True}, timeout=300)
            r["label"] = spec.get("label", spec["loader"])
            runs.append(r)
            log(f"cold {r}")
            save()
    # The disk's own limit again at the end (caches are cold by now anyway).
    drop_caches()
    res["limits"]["odirect_read_16t_gbps"] = parallel_read(
        ours, direct=True, limit=4 * GiB if args.skip_cold else None
    )
    log(f"limits: {res['limits']}")
    save()
    report(res)


def wheels_ab(args, res, save):
    """Same-run A/B of builds: see the module docstring. Every load is a fresh process whose
    PYTHONPATH names one build; each round runs the builds in turn, the order alternating."""
    import torch
    from tensorizer_rs import EncryptionParams, TensorSerializer

    sites = dict(w.split("=", 1) for w in args.wheels)
    t_start = time.perf_counter()
    res["wheels"] = sites
    res["limits"] = measure_h2d()
    log(f"pinned H2D: {res['limits']}")
    # The model, written once by the build this script runs with (the format is the same).
    shapes, layers = llama_shapes(int(args.gib * GiB))
    g = torch.Generator(device="cuda").manual_seed(0)
    m = build_module(shapes, "cuda", torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(generator=g)
    res["model"] = {"layers": layers, "tensors": len(shapes)}
    res["model"]["bytes"] = sum(p.nbytes for p in m.parameters())
    plain, sealed = os.path.join(args.dir, "model.tensors"), os.path.join(args.dir, "enc.tensors")
    enc = EncryptionParams.random()
    for path, kw in ((plain, {}), (sealed, {"encryption": enc})):
        t0 = time.perf_counter()
        s = TensorSerializer(path, **kw)
        s.write_module(m)
        s.close()
        log(
            f"wrote {path}: {os.path.getsize(path) / GiB:.2f} GiB in {time.perf_counter() - t0:.1f} s"
        )
    del m
    torch.cuda.empty_cache()
    res["limits"]["staged"] = staged_limits(plain)
    log(f"staged cap: {res['limits']['staged']['cap_gbps']:.1f} GB/s")
    save()

    cases = [
        {"loader": "ours", "path": plain, "label": "new tensors"},
        {"loader": "ours_module", "path": plain, "label": "in place"},
        {"loader": "vllm_path", "path": plain, "label": "vLLM fill"},
        {"loader": "encrypted", "path": sealed, "key": enc.key.hex(), "label": "encrypted"},
    ]
    nginx = None
    if args.nginx:
        sys.path.insert(0, HERE)
        import bench_remote

        work = os.path.join(args.dir, "nginx")
        os.makedirs(work, exist_ok=True)
        nginx, port, _ = bench_remote.start_nginx(args.nginx, args.dir, work)
        url, size = f"http://127.0.0.1:{port}/model.tensors", os.path.getsize(plain)
        cases.append({"loader": "ours", "path": url, "bytes": size, "label": "HTTP to CUDA"})
        if shutil.which("curl"):
            res["limits"]["http_curl_x16_gbps"] = bench_remote.curl_parallel(url, size, 16)

    def rounds(specs, n, cold=False):
        names = list(sites)
        for k in range(n):
            for spec in specs:
                for name in names[::-1] if k % 2 else names:
                    r = run_child(
                        args,
                        {**spec, "cold": cold, "env": {"PYTHONPATH": sites[name]}},
                        timeout=300 if cold else 240,
                    )
                    r.update(label=spec["label"] + (" (cold)" if cold else ""), build=name, round=k)
                    runs.append(r)
                    log(
                        f"{r['label']:<20} {name:<8} #{k} "
                        + (
                            f"{r['gbps']:6.2f} GB/s"
                            if "gbps" in r
                            else f"ERROR {r.get('error', '')[-300:]}"
                        )
                    )
                    save()

    runs = res["runs"] = []
    try:
        parallel_read(plain, direct=False)  # both files in the page cache
        parallel_read(sealed, direct=False)
        rounds(cases, args.rounds)
        if nginx is not None and shutil.which("curl"):
            res["limits"]["http_curl_x16_after_gbps"] = bench_remote.curl_parallel(url, size, 16)
    finally:
        if nginx is not None:
            nginx.kill()
            nginx.wait()
    drop_caches()
    res["limits"]["odirect_read_16t_gbps"] = parallel_read(plain, direct=True, limit=4 * GiB)
    rounds(
        [{"loader": "ours", "path": plain, "label": "new tensors"}],
        max(1, args.rounds - 1),
        cold=True,
    )
    res["seconds"] = time.perf_counter() - t_start
    save()
    report_ab(res)


def encrypted_vs_plain(args, res, save):
    """Encrypted loads against plaintext ones in one run (issue 27: encrypted >= 85 % of
    plaintext warm; equal within noise cold and over HTTP; host RSS growth unchanged). The same
    model is written plain and sealed (bench_lib's writer: a manifest of per-tensor checksums),
    then each load runs in a fresh process (bench_lib's child: prepared before the clock, every
    tensor's bytes checked against the manifest after it), rounds interleaved, odd rounds
    reversed:
      warm   both files in the page cache; new tensors and in place, plus host decryption
             (TENSORIZER_RS_GPU_DECRYPT=0) beside for reference;
      HTTP   with --nginx: nginx serving --dir from the page cache, new tensors and in place;
      cold   the file evicted before each load (drop_caches as root, else posix_fadvise),
             new tensors and in place.
    --dry-run: the same on the CPU with a tiny model (fadvise eviction), for CI."""
    sys.path.insert(0, HERE)
    import bench_lib as bl

    dev = "cpu" if args.dry_run else "cuda:0"
    evict = "fadvise" if args.dry_run or os.geteuid() != 0 else "drop"
    budget = bl.Budget(args.budget)
    log_path = os.path.join(args.out, "bench.log")
    t_start = time.perf_counter()
    if not args.dry_run:
        res["limits"] = measure_h2d()
    dims = bl.DIMS["tiny" if args.dry_run else "llama8b"]
    layers = bl.layers_for(int(args.gib * GiB), dims)
    base = os.path.join(args.dir, "model")
    w = bl.run_one(
        {
            "job": "write",
            "device": dev,
            "files": [
                {
                    "base": base,
                    "shapes": bl.hf_shapes(layers, dims),
                    "seed": 0,
                    "formats": ["tensors", "enc"],
                }
            ],
        },
        timeout=max(120.0, budget.left()),
        log_path=log_path,
    )
    if "error" in w:
        raise SystemExit(f"writing the model failed: {w['error']}")
    f = w["files"][0]
    plain, sealed = f["formats"]["tensors"]["path"], f["formats"]["enc"]["path"]
    res["model"] = {"layers": layers, "tensors": f["tensors"], "bytes": f["bytes"]}
    res["model"]["file_bytes"] = {k: v["file_bytes"] for k, v in f["formats"].items()}
    res["evict"] = evict
    log(
        f"wrote {plain} and {sealed}: {f['bytes'] / GiB:.2f} GiB, {f['tensors']} tensors, "
        + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in f["formats"].items())
    )
    save()

    def spec(loader, path, label, **extra):
        return {
            "job": "load",
            "device": dev,
            "loader": loader,
            "path": path,
            "manifest": f["manifest"],
            "encrypted": path.endswith(".enc.tensors"),
            "label": label,
            **extra,
        }

    def pair(cache, where_plain, where_sealed):
        return [
            spec("ours", where_plain, f"{cache}: plain new", cache=cache),
            spec("ours", where_sealed, f"{cache}: encrypted new", cache=cache),
            spec("ours_module", where_plain, f"{cache}: plain in place", cache=cache),
            spec("ours_module", where_sealed, f"{cache}: encrypted in place", cache=cache),
        ]

    warm_cases = pair("warm", plain, sealed) + [
        spec(
            "ours",
            sealed,
            "warm: encrypted new (host)",
            cache="warm",
            env={"TENSORIZER_RS_GPU_DECRYPT": "0"},
        )
    ]
    runs = res["runs"] = []
    res["skipped"] = {}

    def one(s, k):
        key = s["label"]
        if not budget.fits(key, 60.0):
            res["skipped"][f"{key} #{k}"] = "out of time (--budget)"
            return
        if s["cache"] == "cold":
            bl.evict([s["path"]], evict)
        t0 = time.monotonic()
        r = bl.run_one(s, timeout=budget.timeout(), log_path=log_path)
        budget.note(key, time.monotonic() - t0)
        r.update(label=key, cache=s["cache"], round=k, file=s["path"])
        runs.append(r)
        c = r.get("counters") or {}
        chk = r.get("check") or {}
        log(
            f"{key:<28} #{k} "
            + (
                f"{r['gbps']:6.2f} GB/s, check {'ok' if chk.get('ok') else chk.get('bad')}, "
                f"RSS +{r.get('rss_anon_growth', 0) / MiB:.0f} MiB"
                + (
                    f", on device {c.get('decrypted_on_device', 0) / GiB:.2f} GiB, in staging "
                    f"{c.get('decrypted_in_staging', 0) / GiB:.2f} GiB"
                    if c
                    else ""
                )
                if "gbps" in r
                else f"ERROR {r.get('error', '')[-300:]}"
            )
        )
        save()

    def rounds(cases, n):
        for k in range(n):
            for s in cases[::-1] if k % 2 else cases:
                one(s, k)

    bl.warm([plain, sealed])
    # Untimed: the first process on a machine compiles the kernels into the kernel cache.
    first = bl.run_one(warm_cases[1], timeout=budget.timeout(), log_path=log_path)
    log(f"first encrypted load (compiles the kernels): {first.get('gbps', first.get('error'))}")
    rounds(warm_cases, args.rounds)

    nginx = None
    if args.nginx:
        import bench_remote

        work = os.path.join(args.dir, "nginx")
        os.makedirs(work, exist_ok=True)
        nginx, port, _ = bench_remote.start_nginx(args.nginx, args.dir, work)
        url = f"http://127.0.0.1:{port}/"
        try:
            bl.warm([plain, sealed])  # nginx serves them from the page cache
            http = pair(
                "HTTP",
                url + os.path.basename(plain),
                url + os.path.basename(sealed),
            )
            rounds(http, args.rounds)
        finally:
            nginx.kill()
            nginx.wait()
    else:
        res["skipped"]["HTTP"] = "no --nginx"
        log("HTTP rows skipped: no --nginx")

    if args.skip_cold:
        res["skipped"]["cold"] = "--skip-cold"
    else:
        rounds(pair("cold", plain, sealed), max(1, args.rounds - 1))
    res["seconds"] = time.perf_counter() - t_start
    save()
    enc_summary(res, args)
    save()


def enc_summary(res, args):
    """Per row (cache x new/in place): mean GB/s of plaintext and of encrypted loads, their
    ratio against the target, and the highest host RssAnon growth of each; checks last."""
    runs = res["runs"]

    def stat(label):
        ok = [r for r in runs if r["label"] == label and "gbps" in r]
        if not ok:
            return None
        return {
            "gbps": statistics.mean(r["gbps"] for r in ok),
            "n": len(ok),
            "rss_mib": max(r.get("rss_anon_growth", 0) for r in ok) / MiB,
        }

    def fmt(x, f="{:.2f}"):
        return "ERR" if x is None else f.format(x)

    targets = {"warm": ">= 85 %", "cold": "equal within noise", "HTTP": "equal within noise"}
    rows = []
    log("")
    log(
        f"{res['gpu']} | {res['cpus']} CPUs | commit {res['commit']} | model "
        f"{res['model']['bytes'] / GiB:.2f} GiB bf16, {res['model']['tensors']} tensors | "
        f"{args.rounds} rounds | {res.get('seconds', 0):.0f} s | evict {res['evict']}"
        + (f" | pinned H2D {res['limits']['pinned_h2d_gbps']:.1f} GB/s" if "limits" in res else "")
    )
    log(
        f"{'row':<22}{'plain GB/s':>11}{'enc GB/s':>10}{'enc/plain':>11}  {'target':<20}"
        f"{'RssAnon+ plain / enc':>22}"
    )
    for cache in ("warm", "HTTP", "cold"):
        for what, ref in (("new", "new"), ("in place", "in place"), ("new (host)", "new")):
            p = stat(f"{cache}: plain {ref}")
            e = stat(f"{cache}: encrypted {what}")
            if e is None and p is None or (what == "new (host)" and e is None):
                continue
            ratio = e["gbps"] / p["gbps"] if p and e else None
            row = {
                "cache": cache,
                "load": what,
                "plain_gbps": p and p["gbps"],
                "encrypted_gbps": e and e["gbps"],
                "ratio": ratio,
                "plain_rss_anon_mib": p and p["rss_mib"],
                "encrypted_rss_anon_mib": e and e["rss_mib"],
            }
            rows.append(row)
            target = "(reference)" if "host" in what else targets[cache]
            log(
                f"{cache + ' ' + what:<22}{fmt(row['plain_gbps']):>11}"
                f"{fmt(row['encrypted_gbps']):>10}{fmt(ratio, '{:.1%}'):>11}  {target:<20}"
                f"{fmt(row['plain_rss_anon_mib'], '{:.0f}'):>12} / "
                f"{fmt(row['encrypted_rss_anon_mib'], '{:.0f}')} MiB"
            )
    bad = [r for r in runs if "error" in r or not (r.get("check") or {}).get("ok")]
    log(
        f"checks: {len(runs) - len(bad)} of {len(runs)} loads gave the manifest's bytes"
        + (f"; failed: {[r['label'] + ' #' + str(r['round']) for r in bad]}" if bad else "")
    )
    for k, why in res.get("skipped", {}).items():
        log(f"skipped {k}: {why}")
    res["summary"] = rows


def report_ab(res):
    """The comparison, last: GB/s of each build per round, and after against before."""
    lim = res["limits"]
    names = list(res["wheels"])
    log("")
    log(
        f"{res['gpu']} | {res['cpus']} CPUs | commit {res['commit']} | model "
        f"{res['model']['bytes'] / GiB:.2f} GiB bf16, {res['model']['tensors']} tensors | "
        f"{res.get('seconds', 0):.0f} s"
    )
    log(
        f"limits: pinned H2D {lim['pinned_h2d_gbps']:.1f} GB/s, staged cap "
        f"{lim['staged']['cap_gbps']:.1f}, O_DIRECT disk {lim.get('odirect_read_16t_gbps', 0):.2f}"
        + (
            f", curl x16 over HTTP {lim['http_curl_x16_gbps']:.1f} / "
            f"{lim.get('http_curl_x16_after_gbps', 0):.1f} (before / after the loads)"
            if "http_curl_x16_gbps" in lim
            else ""
        )
    )
    labels = list(dict.fromkeys(r["label"] for r in res["runs"]))
    head = "".join(f"{n:>24}" for n in names)
    log(f"{'load (GB/s per round)':<22}{head}  {'mean ' + names[-1] + '/' + names[0]}")
    for label in labels:
        got = {
            n: [r.get("gbps") for r in res["runs"] if r["label"] == label and r["build"] == n]
            for n in names
        }
        cells = "".join(
            f"{' / '.join('ERR' if g is None else f'{g:.2f}' for g in got[n]):>24}" for n in names
        )
        ok = {n: [g for g in got[n] if g is not None] for n in names}
        ratio = ""
        if all(ok.values()):
            mean = {n: statistics.mean(ok[n]) for n in names}
            ratio = f"{mean[names[-1]] / mean[names[0]] - 1:+.1%}"
        log(f"{label:<22}{cells}  {ratio:>10}")


def report(res):
    lim = res["limits"]
    h2d = lim["pinned_h2d_gbps"]
    disk = max(v for k, v in lim.items() if k.startswith("odirect"))
    log("")
    log(
        f"{res['gpu']} | commit {res['commit']} | model {res['model']['bytes'] / GiB:.2f} GiB bf16, "
        f"{res['model']['tensors']} tensors"
    )
    log(
        f"limits: pinned H2D {h2d:.1f} GB/s (64 MiB x 4 streams {lim['pinned_h2d_64MiB_4streams_gbps']:.1f}); "
        f"page cache->host 16 thr {lim['page_cache_read_16t_gbps']:.1f} GB/s; "
        f"page cache->pinned (best) {lim.get('page_cache_to_pinned_gbps', 0):.1f} GB/s; O_DIRECT disk (best of "
        f"{sum(k.startswith('odirect') for k in lim)}) {disk:.2f} GB/s"
    )
    staged = lim.get("staged", {})
    cap = staged.get("cap_gbps") or h2d
    if staged:
        pairs = ", ".join(
            f"{k.split('_')[0]} readers {v['h2d_gbps']:.1f}/{v['reads_gbps']:.1f}"
            for k, v in staged.items()
            if isinstance(v, dict)
        )
        log(f"H2D / reads at the same time: {pairs}; staged cap {cap:.1f} GB/s")
    log(
        f"{'loader':<26}{'cache':<6}{'GB/s':>8}{'ratio':>8}{'/staged':>8}{'RssAnon+':>11}{'GPU+':>10}"
    )
    for r in res["runs"]:
        name = r.get("label", r["loader"])
        cache = "cold" if r.get("cold") else "warm"
        if "error" in r:
            log(f"{name:<26}{cache:<6} ERROR {r['error'][-300:]}")
            continue
        limit = disk if r.get("cold") else h2d
        vs_cap = "" if r.get("cold") else f"{r['gbps'] / cap:.0%}"
        log(
            f"{name:<26}{cache:<6}{r['gbps']:8.2f}{r['gbps'] / limit:8.0%}{vs_cap:>8}{r['rss_anon_growth'] / MiB:9.0f}Mi"
            f"{r['gpu_driver_growth'] / GiB:8.2f}Gi"
        )
    s = res["small"]
    log(f"small file: {s.get('tensors')} tensors, us/tensor:")
    for k in ("us_per_tensor_cuda", "us_per_tensor_cuda_no_sharing", "us_per_tensor_cpu"):
        v = s.get(k)
        if isinstance(v, dict):
            log(
                f"  {k.replace('us_per_tensor_', ''):<22} total {v['total']:6.2f}  constructor {v['constructor']:6.2f}  "
                f"native {v['native']:6.2f}"
            )
    log(
        f"  coreweave cuda total {s.get('us_per_tensor_coreweave_cuda')} {s.get('coreweave_error', '')}"
    )


if __name__ == "__main__":
    main()
