"""Shared pieces of the benchmarks that load a model in fresh processes (peers_bench.py,
tp_bench.py; results: docs/benchmarks.md).

* Shapes: a Llama-like bf16 model of a given size, with Hugging Face names (what a
  `.safetensors` checkpoint holds) or vLLM's tensor-parallel shards of it (`qkv_proj`,
  `gate_up_proj`, the vocabulary padded to 64 and split; what `tensorize_vllm_model` writes per
  rank).
* Writing: random tensors made on the device, a per-tensor checksum of each, then `.tensors`
  (ours; plain and/or encrypted) and `.safetensors`, and a manifest (`<base>.json`: names,
  shapes, checksums, the key of the encrypted copy).
* Checks: the checksum of every loaded tensor, computed where it lies (on the GPU), compared
  with the manifest after the clock stops.
* Limits: pinned host->device copies, parallel reads of a file (buffered or O_DIRECT, into
  page-aligned or pinned buffers), made before the clock and timed alone.
* Cache: warm a file (read it through the page cache) or evict it (drop_caches as root, or
  posix_fadvise(DONTNEED) per file, which touches nothing but our files).
* Processes: every measurement runs in a child (`python3 bench/bench_lib.py --child SPEC`)
  that prepares (imports, CUDA context, buffers, the model to fill in place), says READY, and
  starts its clock when the parent says GO; the parent releases a group of children together
  (tensor-parallel ranks) and collects their RESULT lines. The children's monotonic clocks are
  the host's CLOCK_MONOTONIC, so one group's start and end times compare.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

GiB = 1 << 30
MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))

# Llama-3-8B's dimensions (the GPU runs) and a tiny model of the same structure (dry runs).
DIMS = {
    "llama8b": {"hidden": 4096, "inter": 14336, "kv": 1024, "vocab": 128256},
    "tiny": {"hidden": 256, "inter": 768, "kv": 64, "vocab": 4096},
}


def log(*a, file=None):
    print(*a, flush=True)
    if file is not None:
        with open(file, "a") as f:
            print(*a, file=f)


def run_log(out: str, name: str):
    """A benchmark's files under `out`: `name`.log (emptied), `name`.json, and `say`, which
    prints and logs a line stamped with the seconds since this call."""
    os.makedirs(out, exist_ok=True)
    logf, jsonf = os.path.join(out, f"{name}.log"), os.path.join(out, f"{name}.json")
    open(logf, "w").close()
    t0 = time.monotonic()

    def say(*x):
        log(f"[{time.monotonic() - t0:5.0f} s]", *x, file=logf)

    return logf, jsonf, say


def finish(res: dict, table: list, name: str, logf: str, jsonf: str, say) -> None:
    """A run's end: its table into the results, the results saved, `name`.png drawn beside them
    (where matplotlib is), the table printed and logged."""
    res["table"] = table
    with open(jsonf, "w") as f:
        json.dump(res, f, indent=1)
    try:
        import chart

        png = os.path.join(os.path.dirname(jsonf), f"{name}.png")
        chart.draw(res, png)
        say(f"chart: {png}")
    except Exception as e:  # noqa: BLE001  (matplotlib missing, most often: keep the table)
        say(f"no chart here ({e!r}); draw it with: python3 bench/chart.py {jsonf}")
    for line in table:
        log(line, file=logf)


# ------------------------------------------------------------------------------ shapes
def _numel(shape) -> int:
    return math.prod(shape)


def hf_shapes(layers: int, dims: dict) -> list:
    """A Llama checkpoint's tensors as Hugging Face names them (bf16)."""
    h, i, kv, v = dims["hidden"], dims["inter"], dims["kv"], dims["vocab"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def vllm_shard_shapes(layers: int, dims: dict, tp: int) -> list:
    """One rank's tensors of the same model in vLLM with tensor_parallel_size=tp: q/k/v merged
    and split by heads (column parallel), gate/up merged and split, o_proj and down_proj split
    along their input (row parallel), the vocabulary padded to a multiple of 64 and split,
    norms replicated. Every rank's shapes are the same."""
    h, i, kv, v = dims["hidden"], dims["inter"], dims["kv"], dims["vocab"]
    vp = -(-v // 64) * 64
    for what, n in (("hidden", h), ("kv", kv), ("inter", i), ("padded vocab", vp)):
        if n % tp:
            raise ValueError(f"{what} {n} does not split {tp} ways")
    out = [("model.embed_tokens.weight", (vp // tp, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.qkv_proj.weight", ((h + 2 * kv) // tp, h)),
            (p + "self_attn.o_proj.weight", (h, h // tp)),
            (p + "mlp.gate_up_proj.weight", (2 * i // tp, h)),
            (p + "mlp.down_proj.weight", (h, i // tp)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vp // tp, h))]


def layers_for(min_bytes: int, dims: dict, elem: int = 2) -> int:
    """The fewest layers (at least one) that make the model >= min_bytes."""
    fixed = elem * sum(_numel(s) for _, s in hf_shapes(0, dims))
    per = elem * sum(_numel(s) for _, s in hf_shapes(1, dims)) - fixed
    return max(1, -(-(min_bytes - fixed) // per))


# ------------------------------------------------------------------------------ checksums
_WEIGHTS: dict = {}
_CHUNK = 1 << 24  # elements per step: 16 Mi int16 -> three 128 MiB int64 temporaries


def checksum(t) -> str:
    """A position-sensitive checksum of a tensor's bytes, computed on the tensor's device:
    per 16 Mi-element chunk of its int16 words (bytes if odd), the exact sum and the sum
    weighted by position (weights 1..65521), fed in order into BLAKE2b. Exact integer math, so
    a GPU's and a CPU's answers agree; one host sync per tensor."""
    import torch

    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    x = flat.view(torch.int16) if flat.numel() % 2 == 0 else flat
    n = x.numel()
    h = hashlib.blake2b(digest_size=16)
    h.update(str(flat.numel()).encode())
    if n == 0:
        return h.hexdigest()
    w = _WEIGHTS.get(x.device)
    if w is None:
        w = _WEIGHTS[x.device] = (
            torch.arange(_CHUNK, device=x.device, dtype=torch.int64) % 65521 + 1
        )
    sums = []
    for a in range(0, n, _CHUNK):
        c = x[a : a + _CHUNK].to(torch.int64)
        sums.append(torch.stack([c.sum(), (c * w[: c.numel()]).sum()]))
    for s, ws in torch.stack(sums).cpu().tolist():
        h.update(s.to_bytes(8, "little", signed=True) + ws.to_bytes(8, "little", signed=True))
    return h.hexdigest()


def check_tensors(tensors: dict, manifest: dict) -> dict:
    """Compares loaded tensors (name -> tensor) with the manifest: the same names, shapes,
    dtypes and checksums. Returns {"ok", "tensors", "bytes", "bad": [first problems]}."""
    want = {n: (tuple(s), d, c) for n, s, d, _nb, c in manifest["tensors"]}
    bad = []
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing:
        bad.append(f"missing {len(missing)}: {missing[:3]}")
    if extra:
        bad.append(f"unexpected {len(extra)}: {extra[:3]}")
    nbytes = 0
    for name, t in tensors.items():
        if name not in want:
            continue
        shape, dtype, c = want[name]
        if tuple(t.shape) != shape or str(t.dtype).replace("torch.", "") != dtype:
            bad.append(f"{name}: {tuple(t.shape)} {t.dtype}, want {shape} {dtype}")
        elif checksum(t) != c:
            bad.append(f"{name}: bytes differ")
        else:
            nbytes += t.numel() * t.element_size()
    return {"ok": not bad, "tensors": len(tensors), "bytes": nbytes, "bad": bad[:5]}


def read_manifest(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ modules
def file_shapes(path):
    """The names and shapes of a .tensors file's tensors, from its index."""
    from tensorizer_rs import _native

    f = _native.TensorFile(path)
    try:
        return [(e["name"], tuple(e["shape"])) for e in f.entries()]
    finally:
        f.close()


def build_module(shapes, device, dtype, tensors=None):
    """A module tree holding one parameter per (dotted name, shape): empty on `device`, or the
    given tensors (name -> tensor) themselves."""
    import torch

    root = torch.nn.Module()
    for name, shape in shapes:
        *path, attr = name.split(".")
        node = root
        for p in path:
            if not hasattr(node, p):
                node.add_module(p, torch.nn.Module())
            node = getattr(node, p)
        t = (
            tensors[name]
            if tensors is not None
            else torch.empty(tuple(shape), dtype=dtype, device=device)
        )
        node.register_parameter(attr, torch.nn.Parameter(t, requires_grad=False))
    return root


# ------------------------------------------------------------------------------ host memory
def _status(keys=("RssAnon", "VmRSS")) -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in keys:
                out[k] = int(line.split()[1]) * 1024
    return out


class PeakRss:
    """Samples RssAnon and VmRSS every 2 ms in a thread; ``peak`` holds the highest of each."""

    def __init__(self):
        self.base = _status()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self):
        for k, v in _status().items():
            self.peak[k] = max(self.peak.get(k, 0), v)

    def _run(self):
        while not self._stop.wait(0.002):
            self._sample()

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        self._sample()
        return {
            "rss_anon_growth": self.peak["RssAnon"] - self.base["RssAnon"],
            "rss_growth": self.peak["VmRSS"] - self.base["VmRSS"],
        }


# ------------------------------------------------------------------------------ files and cache
def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def evict(paths, how: str) -> None:
    """Make the next reads of `paths` come from the disk: "drop" (sync + drop_caches, root,
    the whole host) or "fadvise" (fsync + POSIX_FADV_DONTNEED on each file, nothing else)."""
    if how == "drop":
        drop_caches()
        return
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class Reader:
    """`threads` threads reading a file (or its first `limit` bytes) in `chunk` pieces with
    preadv, each into its own buffer: page-aligned anonymous memory, or page-locked memory from
    cudaHostAlloc (pinned=True, as a staging loader reads). Each thread takes the next chunk.
    Buffers are made and touched at construction, before any clock; ``run()`` reads once
    through and returns (bytes, seconds)."""

    def __init__(
        self,
        path,
        threads=16,
        chunk=64 * MiB,
        direct=False,
        pinned=False,
        limit=None,
    ):
        import mmap

        size = os.path.getsize(path)
        self.size = min(size, limit) if limit else size
        self.chunk, self.threads = chunk, threads
        self.fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        self.bufs = []
        for _ in range(threads):
            if pinned:
                import torch

                b = memoryview(torch.empty(chunk, dtype=torch.uint8, pin_memory=True).numpy())
            else:
                b = memoryview(mmap.mmap(-1, chunk))  # page-aligned, as O_DIRECT needs
            b[::4096] = b"\0" * len(b[::4096])  # fault the pages in
            self.bufs.append(b)

    def run(self):
        offsets = list(range(0, self.size, self.chunk))[::-1]
        lock = threading.Lock()
        done = [0]
        errors = []

        def work(buf, offsets):
            try:
                while True:
                    with lock:
                        if not offsets:
                            return
                        off = offsets.pop()
                    n = os.preadv(self.fd, [buf], off)  # whole chunks: O_DIRECT wants them
                    with lock:
                        done[0] += n
            except OSError as e:
                errors.append(e)

        ts = [threading.Thread(target=work, args=(b, offsets)) for b in self.bufs]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return done[0], dt

    def close(self):
        os.close(self.fd)
        self.bufs = []


def thp_enabled() -> bool:
    """Whether this kernel gives transparent huge pages at all (to madvise'd memory at least)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def read_gbps(path, threads, chunk, direct=True, limit=None, c_reader=None, pages="") -> float:
    """GB/s of one pass of `threads` threads taking the next `chunk` of `path` (its first
    `limit` bytes): Python threads (`Reader`), or with `c_reader` (bench/direct_reader.c built)
    C threads, O_DIRECT only, their buffers on `pages` ("4k", "huge"; "" the system's default)."""
    if c_reader:
        assert direct, "direct_reader reads with O_DIRECT only"
        cmd = [c_reader, path, str(threads), str(chunk), str(limit or 0)] + (
            [pages] if pages else []
        )
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
        res = json.loads(out.stdout)
        if pages == "huge" and res.get("huge_kb", 0) <= 0:
            raise ValueError(f"asked for huge pages, got none: {res}")  # not what it says it is
        return res["gbps"]
    r = Reader(path, threads=threads, chunk=chunk, direct=direct, limit=limit)
    try:
        n, secs = r.run()
    finally:
        r.close()
    return n / secs / 1e9


def warm(paths, threads=16) -> float:
    """Reads each file once through the page cache (loaders that read with O_DIRECT never put
    a file there). Returns the seconds taken."""
    t0 = time.perf_counter()
    for p in paths:
        r = Reader(p, threads=threads, chunk=8 * MiB)
        r.run()
        r.close()
    return time.perf_counter() - t0


def mount_of(path: str) -> tuple:
    """(source, mount point, file system type) of the mount holding `path` (/proc/self/mounts);
    ("", "", "?") if none is found."""
    path = os.path.realpath(path)
    best = ("", "", "?")
    with open("/proc/self/mounts") as f:
        for line in f:
            src, mnt, kind = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[1]):
                best = (src, mnt, kind)
    return best


def fs_type(path: str) -> str:
    """The file system type of the mount holding `path`."""
    return mount_of(path)[2]


def commit() -> str:
    """BENCH_COMMIT (the checkout on the GPU machine may carry a stale HEAD), else git's."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(
            ["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return ""


def host_info() -> dict:
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,pci.bus_id", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        ).stdout
        info["gpus"] = [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        info["gpus"] = []
    return info


def disk_info(path: str) -> dict:
    """The file system under path and the block device behind it, from /proc and sysfs: what
    tells one host's disk from another's when cold figures differ (virtio or NVMe, request
    size limits, queues, scheduler). Fields that a host lacks are left out."""
    real = os.path.realpath(path)
    src, mnt, kind = mount_of(real)
    info: dict = {"source": src, "mount": mnt, "fs": kind}
    st = os.stat(real)
    sys_dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    if not os.path.isdir(sys_dev):
        return info  # not a block device (tmpfs, overlay, NFS): no queue to describe
    dev = os.path.realpath(sys_dev)
    if os.path.exists(os.path.join(dev, "partition")):
        dev = os.path.dirname(dev)  # a partition's queue is its disk's
    info["block"] = os.path.basename(dev)

    def read(rel):
        try:
            with open(os.path.join(dev, rel)) as f:
                return f.read().strip()
        except OSError:
            return None

    driver = os.path.join(dev, "device", "driver")
    if os.path.islink(driver):
        info["driver"] = os.path.basename(os.readlink(driver))
    for rel in ("device/model", "queue/max_sectors_kb", "queue/max_hw_sectors_kb",
                "queue/max_segments", "queue/nr_requests", "queue/scheduler",
                "queue/rotational"):  # fmt: skip
        v = read(rel)
        if v is not None:
            info[os.path.basename(rel)] = v
    if os.path.isdir(os.path.join(dev, "mq")):
        info["hw_queues"] = len(os.listdir(os.path.join(dev, "mq")))
    slaves = os.path.join(dev, "slaves")
    if os.path.isdir(slaves) and os.listdir(slaves):
        info["slaves"] = sorted(os.listdir(slaves))  # device-mapper or md: the disks below
    return info


# ------------------------------------------------------------------------------ child jobs
def _sync(device: str):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _version(mod: str):
    try:
        import importlib.metadata as md

        return md.version(mod)
    except Exception:  # noqa: BLE001
        return None


def job_write(spec):
    """Makes each file of spec["files"] ({base, shapes, seed, formats}) on spec["device"]:
    formats "tensors" (ours), "enc" (ours, encrypted with a random key, same data) and
    "safetensors"; writes <base>.json, the manifest. No clock: everything happens in prepare."""
    import torch

    dev = spec["device"]
    out = []
    for f in spec["files"]:
        g = torch.Generator(device=dev).manual_seed(f["seed"])
        t0 = time.perf_counter()
        sd, rows = {}, []
        for name, shape in f["shapes"]:
            t = torch.randn(tuple(shape), generator=g, device=dev, dtype=torch.bfloat16)
            rows.append([name, list(shape), "bfloat16", t.numel() * 2, checksum(t)])
            sd[name] = t.cpu()
            del t
        res = {"base": f["base"], "bytes": sum(r[3] for r in rows), "tensors": len(rows)}
        res["make_seconds"] = time.perf_counter() - t0
        res["formats"] = {}
        manifest = {"bytes": res["bytes"], "tensors": rows, "key": None}
        for fmt in f["formats"]:
            t0 = time.perf_counter()
            if fmt in ("tensors", "enc"):
                from tensorizer_rs import EncryptionParams, TensorSerializer

                enc = EncryptionParams.random() if fmt == "enc" else None
                path = f["base"] + (".enc.tensors" if enc else ".tensors")
                # As a module (vLLM's tensorize_vllm_model does), so load_into_module takes it.
                with TensorSerializer(path, encryption=enc) as s:
                    s.write_module(build_module(f["shapes"], "cpu", None, sd))
                if enc is not None:
                    manifest["key"] = enc.key.hex()
            else:
                from safetensors.torch import save_file

                path = f["base"] + ".safetensors"
                save_file(sd, path)
            res["formats"][fmt] = {
                "path": path,
                "file_bytes": os.path.getsize(path),
                "seconds": time.perf_counter() - t0,
            }
        with open(f["base"] + ".json", "w") as mf:
            json.dump(manifest, mf)
        res["manifest"] = f["base"] + ".json"
        out.append(res)
        del sd
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"files": out}


def job_h2d(spec):
    """Pinned host->device copies of spec["bytes"] (default 4 GiB), spec["repeat"] times after
    GO; each copy timed with CUDA events (median) and the whole run by the wall clock."""
    import torch

    dev = torch.device(spec["device"])
    torch.cuda.set_device(dev)
    n = spec.get("bytes", 4 * GiB)
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    src.fill_(7)
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(dev)

    def run():
        ev = []
        for _ in range(spec.get("repeat", 5)):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            ev.append((a, b))
        torch.cuda.synchronize(dev)
        return ev

    def after(ev):
        times = sorted(a.elapsed_time(b) / 1e3 for a, b in ev)
        return {"bytes": n * len(ev), "median_copy_gbps": n / times[len(times) // 2] / 1e9}

    return run, after


def job_read(spec):
    """A Reader on spec["path"] (threads, chunk, direct, pinned, limit), run after GO."""
    if spec.get("pinned"):
        import torch

        torch.cuda.set_device(torch.device(spec["device"]))
    r = Reader(
        spec["path"],
        threads=spec.get("threads", 16),
        chunk=spec.get("chunk", 64 * MiB),
        direct=spec.get("direct", False),
        pinned=spec.get("pinned", False),
        limit=spec.get("limit"),
    )

    def after(res):
        r.close()
        n, secs = res
        return {"bytes": n, "inner_gbps": n / secs / 1e9}

    return r.run, after


def _ours_stats(d) -> dict:
    """What our loader says about a CUDA load: the pinned staging it used, its counters."""
    out = {}
    try:
        # TensorDeserializer.cuda_load_stats: absent in wheels from before it (then no stats).
        stats = getattr(d, "cuda_load_stats", {}).get("loads", [])
        out["load_stats"] = stats
        pinned = max(
            (s.get("staging_chunk", 0) * s.get("staging_buffers", 0) for s in stats), default=0
        )
        out["pinned_bytes"] = pinned or None
        from tensorizer_rs import _cuda

        out["counters"] = _cuda.counters()
    except Exception as e:  # noqa: BLE001  (internals may change; the figures stay optional)
        out["stats_error"] = repr(e)
    return out


def job_load(spec):
    """One loader, one file, onto spec["device"]. Prepare: imports, CUDA context, the model to
    fill (in place), the key. After GO: the load until every byte is on the device
    (synchronized). After the clock: each tensor's checksum against the manifest."""
    import torch

    dev, path, kind = spec["device"], spec["path"], spec["loader"]
    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(dev))
        torch.empty(1, device=dev)
        torch.cuda.synchronize(dev)
    manifest = read_manifest(spec["manifest"])
    key = bytes.fromhex(manifest["key"]) if spec.get("encrypted") else None
    info = {"loader": kind, "path": path, "device": dev}
    t0 = time.perf_counter()
    if kind in ("ours", "ours_module"):
        from tensorizer_rs import DecryptionParams, TensorDeserializer

        info["version"] = _version("tensorizer-rs")
        enc = DecryptionParams.from_key(key) if key else None
        kw = {"num_readers": spec["num_readers"]} if spec.get("num_readers") else {}
        model = None
        if kind == "ours_module":
            shapes = [(n, s) for n, s, *_ in manifest["tensors"]]
            model = build_module(shapes, dev, torch.bfloat16)

        def load():
            d = TensorDeserializer(path, device=dev, encryption=enc, **kw)
            if model is not None:
                d.load_into_module(model)
                got = model
            else:
                got = {k: d[k] for k in d}  # a CUDA load runs at the first access
            _sync(dev)
            return d, got

        def tensors(res):
            d, got = res
            if cuda:
                info.update(_ours_stats(d))
            return dict(got.state_dict()) if model is not None else got

    elif kind == "coreweave":
        import tensorizer
        from tensorizer import TensorDeserializer as CW

        info["version"] = tensorizer.__version__
        kw = {"num_readers": spec["num_readers"]} if spec.get("num_readers") else {}
        if key:
            from tensorizer.serialization import DecryptionParams as CWDecryption

            kw["encryption"] = CWDecryption.from_key(key)

        def load():
            d = CW(path, device=dev, **kw)  # not lazy: everything loads in the constructor
            got = {k: d[k] for k in d}
            _sync(dev)
            return got

        tensors = dict
    elif kind == "safetensors":
        from safetensors.torch import load_file

        info["version"] = _version("safetensors")

        def load():
            got = load_file(path, device=dev)
            _sync(dev)
            return got

        tensors = dict
    elif kind == "instanttensor":
        from instanttensor import safe_open

        info["version"] = _version("instanttensor")

        def load():
            with safe_open(path, framework="pt", device=torch.device(dev).index) as f:
                got = dict(f.tensors())
            _sync(dev)
            return got

        tensors = dict
    elif kind == "fastsafetensors":
        from fastsafetensors import fastsafe_open

        info["version"] = _version("fastsafetensors")

        def load():
            with fastsafe_open(path, device=dev, nogds=True) as f:
                got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            _sync(dev)
            return got

        tensors = dict
    elif kind == "runai":
        from runai_model_streamer import SafetensorsStreamer

        info["version"] = _version("runai-model-streamer")

        def load():
            with SafetensorsStreamer() as s:
                s.stream_file(path, device=dev)
                got = dict(s.get_tensors())
            _sync(dev)
            return got

        tensors = dict
    else:
        raise ValueError(f"unknown loader {kind!r}")
    info["prepare_seconds"] = time.perf_counter() - t0
    free0 = torch.cuda.mem_get_info(torch.device(dev))[0] if cuda else None

    def after(res):
        got = tensors(res)  # first: for ours it adds the load's stats to info
        out = dict(info)
        if cuda:
            out["gpu_growth"] = free0 - torch.cuda.mem_get_info(torch.device(dev))[0]
        out["check"] = check_tensors(got, manifest)
        out["bytes"] = manifest["bytes"]
        return out

    return load, after


def job_limits(spec):
    """Several limits one after another in one process (spec["items"]: {"name", "job": "h2d"
    or "read", its arguments}), each prepared and timed on its own; returns name -> GB/s (h2d:
    the median copy; read: the reading alone, buffers made before)."""

    def run():
        out = {}
        for item in spec["items"]:
            try:
                go, after = JOBS[item["job"]]({"device": spec["device"], **item})
                r = after(go())
                out[item["name"]] = r.get("median_copy_gbps", r.get("inner_gbps"))
            except Exception as e:  # noqa: BLE001
                out[item["name"]] = None
                out[item["name"] + "_error"] = repr(e)[-500:]
        return out

    return run, lambda out: {"limits": out}


JOBS = {"h2d": job_h2d, "read": job_read, "load": job_load, "limits": job_limits}


def child_main(spec: dict) -> None:
    """A child: prepare the job, say READY, wait for GO, run it on the clock, then check and
    report one RESULT line. Errors are reported, never raised past here."""
    sys.path.extend(p for p in spec.get("extra_path", []) if p)
    res: dict = {"job": spec["job"], "rank": spec.get("rank", 0)}
    try:
        if spec["job"] == "write":  # no clock, no barrier
            res.update(job_write(spec))
            print("RESULT " + json.dumps(res), flush=True)
            return
        run, after = JOBS[spec["job"]](spec)
    except BaseException as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        res["error"] = f"prepare: {e!r}"[-2000:]
        print("READY", flush=True)
        sys.stdin.readline()
        print("RESULT " + json.dumps(res), flush=True)
        return
    peak = PeakRss()
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return
    t0 = time.monotonic()
    try:
        got = run()
        t1 = time.monotonic()
        res.update(peak.stop())
        res.update(t_start=t0, t_end=t1, seconds=t1 - t0)
        res.update(after(got))
        if res.get("bytes"):
            res["gbps"] = res["bytes"] / res["seconds"] / 1e9
    except BaseException as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        res["error"] = repr(e)[-2000:]
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------ the parent side
def run_group(specs: list, timeout: float, log_path: str | None = None, env=None) -> dict:
    """Starts one child per spec, waits until all are READY, releases them together (GO) and
    collects their results. Returns {"t_go", "results" (in spec order), "wall"}; a child that
    fails or outlives `timeout` gives {"error": ...}. Per-spec "env" entries are added to the
    environment."""
    procs, outs, ready = [], [], []
    deadline = time.monotonic() + timeout
    try:
        return _run_group(specs, deadline, log_path, env, procs, outs, ready)
    finally:
        for p, _, _ in procs:  # a parent stopped early (SIGTERM, Ctrl-C) leaves no child behind
            if p.poll() is None:
                p.kill()
                p.wait()


def _run_group(specs, deadline, log_path, env, procs, outs, ready) -> dict:
    for spec in specs:
        e = dict(os.environ if env is None else env)
        e.update({k: str(v) for k, v in spec.get("env", {}).items()})
        err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed once read)
        p = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=e,
        )
        lines, ev = [], threading.Event()

        def pump(p=p, lines=lines, ev=ev):
            for line in p.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith(("READY", "RESULT")):
                    ev.set()
            ev.set()

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        procs.append((p, err, th))
        outs.append(lines)
        ready.append(ev)
    for ev in ready:
        ev.wait(max(0.0, deadline - time.monotonic()))
    t_go = time.monotonic()
    for p, _, _ in procs:
        try:
            p.stdin.write("GO\n")
            p.stdin.close()
        except (BrokenPipeError, OSError):
            pass
    results = []
    for (p, err, th), lines, spec in zip(procs, outs, specs):
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()  # our own child, by its pid
            p.wait()
        th.join(5)
        err.seek(0)
        stderr = err.read()
        err.close()
        if log_path:
            with open(log_path, "a") as f:
                f.write(f"=== {json.dumps(spec)[:400]} (rc {p.returncode})\n")
                f.write("\n".join(lines)[-20000:] + "\n" + stderr[-20000:] + "\n")
        res = next((json.loads(x[7:]) for x in reversed(lines) if x.startswith("RESULT ")), None)
        if res is None:
            why = "timeout" if p.returncode in (-9, 137) else f"exit {p.returncode}"
            res = {"rank": spec.get("rank", 0), "error": f"{why}: {stderr[-1500:]}"}
        results.append(res)
    return {"t_go": t_go, "results": results, "wall": time.monotonic() - t_go}


def run_one(spec: dict, timeout: float, log_path: str | None = None) -> dict:
    return run_group([spec], timeout, log_path)["results"][0]


class Budget:
    """Keeps a benchmark inside its time: a run is skipped when the time it took last (or a
    guess) would pass the deadline, so the run ends with its table instead of being killed."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.took: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, key, guess: float) -> bool:
        return self.took.get(key, guess) < self.left()

    def timeout(self) -> float:
        """A child's limit: until shortly after the deadline (at least a minute)."""
        return max(60.0, self.left() + 30)

    def note(self, key, seconds: float) -> None:
        self.took[key] = seconds


def on_sigterm() -> None:
    """`timeout` stops a benchmark with SIGTERM: turn it into SystemExit, so cleanups (tmpfs
    copies, children) run."""
    import signal

    def stop(*_):
        raise SystemExit("stopped by SIGTERM")

    signal.signal(signal.SIGTERM, stop)


def aggregate(group: dict) -> dict:
    """One group's figures: total bytes, from GO until the last rank is done, per rank GB/s,
    and the aggregate GB/s over the span from the first start to the last end."""
    rs = group["results"]
    ok = [r for r in rs if "error" not in r and "t_end" in r]
    out = {"ranks": len(rs), "failed": len(rs) - len(ok)}
    if not ok:
        return out
    first = min(r["t_start"] for r in ok)
    last = max(r["t_end"] for r in ok)
    total = sum(r.get("bytes", 0) for r in ok)
    out.update(
        bytes=total,
        span=last - first,
        last_done=last - group["t_go"],
        gbps=total / (last - first) / 1e9 if last > first else None,
        rank_gbps=[r.get("gbps") for r in rs],
        checks_ok=all(r.get("check", {}).get("ok", True) for r in ok) and len(ok) == len(rs),
    )
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
    else:
        sys.exit("bench_lib.py runs only as a child of peers_bench.py / tp_bench.py")
