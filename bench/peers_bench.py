#!/usr/bin/env python3
"""Us beside the loaders users would pick instead, one command on the GPU machine (issue 26;
results: docs/benchmarks.md; on the GPU machine: `bash bench/on_device.sh peers`).

    python3 bench/peers_bench.py --dir /local/ext4/dir --out DIR [--gib 9]
        [--coreweave DIR] [--peers DIR] [--shm-dir /dev/shm/tzpeers]
    python3 bench/peers_bench.py --dry-run --dir /tmp/x --out /tmp/o     # CPU, tiny, here

1. Writes one Llama-like bf16 model (Llama-3-8B's dimensions, layers added until >= --gib GiB;
   random data made on the GPU) as `.tensors` (our writer) and `.safetensors` (the same
   tensors), with a per-tensor checksum of each (bench_lib.py), and copies both to tmpfs.
2. Limits, in the same run: pinned host->device copy (4 GiB, median of five); 16 threads
   reading the ext4 file from the page cache, and the tmpfs copy, into pinned 8 / 64 MiB
   buffers (best); 16-thread O_DIRECT reads of both cold files before every cold round and
   after the last, each thread taking the next 64 MiB or the next 512 KiB (fastsafetensors
   0.5.0's nogds pattern); with --c-reader each pattern also by C threads
   (bench/direct_reader.c) into huge pages. The ceiling is the fastest read of the `.tensors`
   file: on the GPU machine's disk C threads read 512 KiB requests 28 % faster than 64 MiB
   ones, which Python threads cannot issue fast enough to show (docs/benchmarks.md).
   `--probes ceiling` reads only that pattern of the `.tensors` file (by C threads with
   --c-reader), ~3 s a round instead of ~55, so a cold A/B fits more rounds in one call.
3. Loads the model onto --device in a fresh process per load (the clock starts once the
   process has its CUDA context and imports, and stops after a synchronize): tensorizer-rs
   (new tensors; in place with load_into_module into a model already on the GPU), InstantTensor
   `safe_open(p, framework="pt", device=0)`, fastsafetensors
   `fastsafe_open(p, device="cuda:0", nogds=True)`, the Run:ai `SafetensorsStreamer`, CoreWeave
   tensorizer (default and num_readers=16), safetensors `load_file(p, device="cuda:0")`.
   Columns: page cache (ext4, read back through the cache before each block, since the loaders
   that use O_DIRECT never warm it), tmpfs (the copies), cold (caches dropped before each load;
   the loaders' order rotates each round). Each load's tensors are checked against the
   checksums after the clock.
4. Writes peers.json (every run, the limits, host RSS growth and our pinned staging) and
   peers.log (the children's output) under --out; draws peers.png if matplotlib is there
   (else: `python3 bench/chart.py OUT/peers.json`); prints the table last: GB/s per
   loader per column and the share of pinned host->device.

Peers that are not importable (with --peers / --coreweave appended to sys.path, so the
image's torch and numpy win) are skipped and say so. A time budget (--budget) skips runs that
would not finish in time rather than lose the table.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib as bl

# name: (label, file format, module to import, extra spec, runs on the CPU)
LOADERS = {
    "ours": ("tensorizer-rs", "tensors", "tensorizer_rs", {}, True),
    "ours_module": ("tensorizer-rs, in place", "tensors", "tensorizer_rs", {}, True),
    "instanttensor": ("InstantTensor", "safetensors", "instanttensor", {}, False),
    "fastsafetensors": ("fastsafetensors (nogds)", "safetensors", "fastsafetensors", {}, True),
    "runai": ("Run:ai streamer", "safetensors", "runai_model_streamer", {}, True),
    "coreweave": ("CoreWeave tensorizer", "tensors", "tensorizer", {}, True),
    "coreweave16": (
        "CoreWeave, num_readers=16",
        "tensors",
        "tensorizer",
        {"num_readers": 16},
        True,
    ),
    "safetensors": ("safetensors load_file", "safetensors", "safetensors", {}, True),
    # Our loader with buffered reads of the uncached pages (readahead), beside `auto`'s
    # O_DIRECT: which a cold disk serves faster differs by host (docs/benchmarks.md).
    "ours_buffered": (
        "tensorizer-rs, IO=buffered",
        "tensors",
        "tensorizer_rs",
        {"loader": "ours", "env": {"TENSORIZER_RS_IO": "buffered"}},
        True,
    ),
    "ours_buffered32": (
        "tensorizer-rs, buffered, 32 rd",
        "tensors",
        "tensorizer_rs",
        {"loader": "ours", "env": {"TENSORIZER_RS_IO": "buffered"}, "num_readers": 32},
        True,
    ),
}
# Variants run on request (--loaders), not by default.
DEFAULT_LOADERS = [n for n in LOADERS if not n.startswith("ours_buffered")]
COLUMNS = ("page", "tmpfs", "cold")
COLUMN_TITLES = {"page": "page cache (ext4)", "tmpfs": "tmpfs", "cold": "cold"}


def _path(r: dict) -> str:
    """Which path our loads took (file system, read mode, readers), from their stats."""
    stats = r.get("load_stats") or []
    if not stats or "fs" not in stats[0]:
        return ""
    s = stats[0]
    return f"  {s['fs']}/{s['read_mode']} {s['readers']} readers x {s.get('load_buffers', '?')} buf"


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="a directory on a local disk (ext4)")
    ap.add_argument(
        "--shm-dir", default=None, help="tmpfs directory (default /dev/shm/tzpeers-PID)"
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument(
        "--gib", type=float, default=None, help="model size, GiB (default 8.4: 16 layers, 9.1 GB)"
    )
    ap.add_argument("--device", default=None, help="default cuda:0 (cpu with --dry-run)")
    ap.add_argument("--loaders", default=",".join(DEFAULT_LOADERS))
    ap.add_argument("--columns", default=",".join(COLUMNS))
    ap.add_argument("--rounds", type=int, default=None, help="page cache and tmpfs (default 2)")
    ap.add_argument("--cold-rounds", type=int, default=None, help="default 2 (after the warm ones)")
    ap.add_argument("--budget", type=float, default=None, help="seconds (default 500)")
    ap.add_argument("--coreweave", default=None, help="a directory holding CoreWeave tensorizer")
    ap.add_argument("--peers", default=None, help="a directory holding the peers (pip --target)")
    ap.add_argument("--evict", choices=("drop", "fadvise"), default=None)
    ap.add_argument("--keep", action="store_true", help="keep the files on --dir")
    ap.add_argument(
        "--c-reader",
        help="bench/direct_reader.c built: the O_DIRECT probes read by C threads too (the "
        "ceiling is the faster of the two)",
    )
    ap.add_argument(
        "--probes",
        choices=("all", "ceiling"),
        default="all",
        help="the O_DIRECT probes between cold rounds: both patterns of both files, or only "
        "16 x 512 KiB of the .tensors file (the ceiling's pattern; C threads with --c-reader)",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="the same orchestration on the CPU with a tiny model (device cpu, 1 round, files "
        "evicted with fadvise, not drop_caches)",
    )
    a = ap.parse_args()
    dry = a.dry_run
    a.device = a.device or ("cpu" if dry else "cuda:0")
    a.gib = a.gib if a.gib is not None else (0.03 if dry else 8.4)
    a.rounds = a.rounds if a.rounds is not None else (1 if dry else 2)
    a.cold_rounds = a.cold_rounds if a.cold_rounds is not None else (1 if dry else 2)
    a.budget = a.budget if a.budget is not None else (240 if dry else 500)
    a.evict = a.evict or ("fadvise" if dry or os.geteuid() != 0 else "drop")
    a.shm_dir = a.shm_dir or f"/dev/shm/tzpeers-{os.getpid()}"
    a.dims = "tiny" if dry else "llama8b"
    return a


def importable(module: str, extra: list) -> bool:
    return importlib.machinery.PathFinder.find_spec(module, sys.path + extra) is not None


def copy_files(pairs):
    """Copies (src, dst) pairs at once, one thread each."""
    errors = []

    def one(s, d):
        try:
            shutil.copyfile(s, d)
        except OSError as e:
            errors.append(e)

    ts = [threading.Thread(target=one, args=p) for p in pairs]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def main():
    a = parse()
    bl.on_sigterm()
    os.makedirs(a.dir, exist_ok=True)
    logf, jsonf, say = bl.run_log(a.out, "peers")
    budget = bl.Budget(a.budget)
    extra = [p for p in (a.peers, a.coreweave) if p]
    res = {
        "kind": "peers",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": bl.commit(),
        "host": bl.host_info(),
        "disk": bl.disk_info(a.dir),
        "args": {k: v for k, v in vars(a).items()},
        "limits": {},
        "runs": [],
        "skipped": [],
    }

    def save():
        with open(jsonf, "w") as f:
            json.dump(res, f, indent=1)

    cuda = a.device.startswith("cuda")
    loaders, skipped = [], {}
    for name in a.loaders.split(","):
        _label, _fmt, module, _x, cpu_ok = LOADERS[name]
        if not cuda and not cpu_ok:
            skipped[name] = "needs CUDA"
        elif not importable(module, extra):
            skipped[name] = f"{module} not importable"
        else:
            loaders.append(name)
    res["loaders_skipped"] = skipped
    for name, why in skipped.items():
        say(f"skip {name}: {why}")
    columns = [c for c in a.columns.split(",") if c]
    say(
        f"host {res['host']}, disk {res['disk']}, commit {res['commit']}, device {a.device}, "
        f"loaders {loaders}, columns {columns}, budget {a.budget:.0f} s"
    )
    shm_files = []
    try:
        # ---------------------------------------------------------------- the model
        dims = bl.DIMS[a.dims]
        layers = bl.layers_for(int(a.gib * bl.GiB), dims)
        base = os.path.join(a.dir, "model")
        w = bl.run_one(
            {
                "job": "write",
                "device": a.device,
                "files": [
                    {
                        "base": base,
                        "shapes": bl.hf_shapes(layers, dims),
                        "seed": 0,
                        "formats": ["tensors", "safetensors"],
                    }
                ],
            },
            budget.timeout(),
            logf,
        )
        if "error" in w:
            raise SystemExit(f"writing the model failed: {w['error']}")
        model = w["files"][0]
        res["model"] = {**model, "layers": layers, "dims": a.dims}
        nbytes = model["bytes"]
        fm = model["formats"]
        say(
            f"model: {layers} layers, {model['tensors']} tensors, {nbytes / 1e9:.2f} GB (made in "
            f"{model['make_seconds']:.1f} s; .tensors written in {fm['tensors']['seconds']:.1f} s, "
            f".safetensors in {fm['safetensors']['seconds']:.1f} s)"
        )
        files = {
            "page": {"tensors": base + ".tensors", "safetensors": base + ".safetensors"},
        }
        files["cold"] = files["page"]
        manifest = model["manifest"]
        res["fs"] = {"dir": bl.fs_type(a.dir)}
        if "tmpfs" in columns:
            need = sum(os.path.getsize(p) for p in files["page"].values())
            os.makedirs(a.shm_dir, exist_ok=True)
            res["fs"]["shm_dir"] = bl.fs_type(a.shm_dir)
            free = shutil.disk_usage(a.shm_dir).free
            if free < need * 1.02:
                say(f"skip tmpfs: {free / 1e9:.1f} GB free on {a.shm_dir}, need {need / 1e9:.1f}")
                columns.remove("tmpfs")
            else:
                files["tmpfs"] = {
                    k: os.path.join(a.shm_dir, os.path.basename(p))
                    for k, p in files["page"].items()
                }
                shm_files = list(files["tmpfs"].values())
                t0 = time.perf_counter()
                copy_files([(files["page"][k], files["tmpfs"][k]) for k in files["page"]])
                say(
                    f"copied to {a.shm_dir} ({res['fs']['shm_dir']}) in {time.perf_counter() - t0:.1f} s"
                )
        save()

        # ---------------------------------------------------------------- limits
        t0 = bl.warm(files["page"].values())
        say(f"warmed the ext4 files in {t0:.1f} s")
        items = []
        if cuda:
            items.append({"name": "pinned_h2d_gbps", "job": "h2d"})
        for col in ("page", "tmpfs"):
            if col not in files:
                continue
            for chunk in (8, 64):
                items.append(
                    {
                        "name": f"{col}_to_{'pinned' if cuda else 'host'}_16x{chunk}MiB_gbps",
                        "job": "read",
                        "path": files[col]["tensors"],
                        "threads": 16,
                        "chunk": chunk * bl.MiB,
                        "pinned": cuda,
                    }
                )
        lim = bl.run_one(
            {"job": "limits", "device": a.device, "items": items}, budget.timeout(), logf
        )
        res["limits"].update(lim.get("limits", {"error": lim.get("error")}))
        for col in ("page", "tmpfs"):
            vals = [v for k, v in res["limits"].items() if k.startswith(col + "_to_") and v]
            if vals:
                res["limits"][f"{col}_read_gbps"] = max(vals)
        say(f"limits: {res['limits']}")
        save()

        # The file formats the loaders read (`.tensors` always: its reads are the limit).
        cold_formats = {"tensors"} | {LOADERS[n][1] for n in loaders}

        def odirect(tag):
            # Both files, the same reader: a disk (or the storage below it) that serves one
            # file faster than the other shows here, not as a loader's lead. Two patterns, 16
            # threads each taking the next 64 MiB or the next 512 KiB (fastsafetensors 0.5.0's
            # nogds reader). Python's buffers are 4 KiB pages, the C reader's huge pages (as
            # our staging is): 512 KiB requests into 4 KiB pages read slower on the GPU
            # machine's disk (an O_DIRECT request's segments follow its pages).
            patterns = [("16x64MiB", 64 * bl.MiB, ""), ("16x512KiB", bl.MiB // 2, "")]
            if a.c_reader:
                huge = "huge" if bl.thp_enabled() else ""
                patterns += [("c" + pat, chunk, huge) for pat, chunk, _ in patterns]
            files_read = (("tensors", "odirect"), ("safetensors", "odirect_st"))
            if a.probes == "ceiling":
                # The last pattern is 16 x 512 KiB, by C threads when there are any.
                patterns, files_read = patterns[-1:], files_read[:1]
            for fmt, key in files_read:
                path = files["cold"].get(fmt)
                if path is None or fmt not in cold_formats:
                    continue
                for pat, chunk, pages in patterns:
                    name = f"{key}_{pat}_{tag}"
                    bl.evict([path], a.evict)
                    c = a.c_reader if pat.startswith("c") else None
                    try:
                        gbps = bl.read_gbps(
                            path, 16, chunk, limit=6 * bl.GiB, c_reader=c, pages=pages
                        )
                        res["limits"][f"{name}_gbps"] = gbps
                    except (OSError, subprocess.SubprocessError, ValueError) as e:  # no O_DIRECT?
                        res["limits"][f"{name}_error"] = repr(e)[-300:]
                    say(f"O_DIRECT {pat}, .{fmt} ({tag}): {res['limits'].get(f'{name}_gbps')}")

        # ---------------------------------------------------------------- loads
        def load(name, col, rnd):
            label, fmt, _m, x, _c = LOADERS[name]
            key = (name, col)
            guess = 15 + (nbytes / 1.0e9 if col == "cold" else nbytes / 2e9)
            if not budget.fits(key, budget.took.get(name, guess)):
                res["skipped"].append(
                    {"loader": name, "column": col, "round": rnd, "why": "budget"}
                )
                say(f"  {col:5s} {name:16s} skipped (time budget)")
                return
            if col == "cold":
                bl.evict(list(files["cold"].values()), a.evict)
            spec = {
                "job": "load",
                "loader": "coreweave" if name.startswith("coreweave") else name,
                "path": files[col][fmt],
                "manifest": manifest,
                "device": a.device,
                "extra_path": extra,
                **x,
            }
            t0 = time.monotonic()
            r = bl.run_one(spec, budget.timeout(), logf)
            budget.note(key, time.monotonic() - t0)
            budget.note(name, time.monotonic() - t0)
            r.update(name=name, label=label, column=col, round=rnd)
            res["runs"].append(r)
            save()
            if "error" in r:
                say(f"  {col:5s} {name:16s} ERROR {r['error'][-300:]}")
            else:
                ck = r["check"]
                say(
                    f"  {col:5s} {name:16s} {r['gbps']:7.2f} GB/s  {r['seconds']:6.2f} s  "
                    f"check {'ok' if ck['ok'] else 'FAILED ' + str(ck['bad'])}  "
                    f"RssAnon+ {r['rss_anon_growth'] / bl.MiB:.0f} MiB"
                    + (
                        f"  pinned {r['pinned_bytes'] / bl.MiB:.0f} MiB"
                        if r.get("pinned_bytes")
                        else ""
                    )
                    + _path(r)
                )

        def rotated(rnd):  # no loader always first
            k = rnd % max(1, len(loaders))
            return loaders[k:] + loaders[:k]

        # The warm columns first (the files are still cached from writing), the cold rounds last.
        for rnd in range(a.rounds):
            if "page" in columns:
                took = bl.warm(files["page"].values())
                say(f"round {rnd + 1}: page cache (warmed in {took:.1f} s)")
                for name in rotated(rnd):
                    load(name, "page", rnd)
            if "tmpfs" in columns:
                say(f"round {rnd + 1}: tmpfs")
                for name in rotated(rnd):
                    load(name, "tmpfs", rnd)
        for rnd in range(a.cold_rounds if "cold" in columns else 0):
            odirect("before" if rnd == 0 else f"round{rnd + 1}")
            say(f"round {rnd + 1}: cold ({a.evict} before each load)")
            for name in rotated(rnd):
                load(name, "cold", rnd)
        if "cold" in columns and budget.left() > 15:
            odirect("after")
        # The ceiling: the .tensors file's fastest 16-thread read, whatever the pattern or reader.
        disk = [
            v
            for k, v in res["limits"].items()
            if k.startswith("odirect_") and not k.startswith("odirect_st_") and k.endswith("_gbps")
        ]
        if disk:
            res["limits"]["odirect_gbps"] = max(disk)
        res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        save()
    finally:
        for p in shm_files:
            if os.path.exists(p):
                os.unlink(p)
        if shm_files:
            shutil.rmtree(a.shm_dir, ignore_errors=True)
        if not a.keep:
            for ext in (".tensors", ".safetensors", ".json"):
                p = os.path.join(a.dir, "model" + ext)
                if os.path.exists(p):
                    os.unlink(p)
    bl.finish(res, table(res), "peers", logf, jsonf, say)


def summarize(res) -> dict:
    """(loader, column) -> {"gbps": [...], "bad": n, "errors": n}."""
    out: dict = {}
    for r in res["runs"]:
        c = out.setdefault((r["name"], r["column"]), {"gbps": [], "bad": 0, "errors": 0})
        if "error" in r:
            c["errors"] += 1
        elif not r["check"]["ok"]:
            c["bad"] += 1
        else:
            c["gbps"].append(r["gbps"])
    return out


def table(res) -> list:
    lim = res["limits"]
    h2d = lim.get("pinned_h2d_gbps")
    disk = lim.get("odirect_gbps")
    s = summarize(res)
    cols = [c for c in COLUMNS if any(k[1] == c for k in s)]
    names = [n for n in LOADERS if any(k[0] == n for k in s)]
    m = res.get("model", {})
    gpu = (res["host"].get("gpus") or ["no GPU"])[0]
    into = "pinned" if res["args"]["device"].startswith("cuda") else "host"
    lines = [
        "",
        (
            f"{gpu} | {res['host'].get('cpus')} CPUs | commit {res['commit']} | "
            f"model {m.get('bytes', 0) / 1e9:.2f} GB bf16, {m.get('tensors')} tensors | "
            f"GB/s to {res['args']['device']}, fresh processes, bytes checked"
        ),
        "limits: pinned H2D "
        + (f"{h2d:.1f}" if h2d else "-")
        + f" GB/s; page cache -> {into} (16 thr) "
        + (f"{lim['page_read_gbps']:.1f}" if lim.get("page_read_gbps") else "-")
        + f"; tmpfs -> {into} (16 thr) "
        + (f"{lim['tmpfs_read_gbps']:.1f}" if lim.get("tmpfs_read_gbps") else "-")
        + "; O_DIRECT 16 thr "
        + (f"{disk:.2f}" if disk else "-"),
    ]
    head = f"| {'loader':<28} |" + "".join(f" {COLUMN_TITLES[c]:>22} |" for c in cols)
    lines += [head, "|" + "-" * 30 + "|" + "".join("-" * 23 + ":|" for _ in cols)]
    for n in names:
        row = f"| {LOADERS[n][0]:<28} |"
        for c in cols:
            v = s.get((n, c))
            if v is None:
                cell = "-"
            elif not v["gbps"]:
                cell = "bad bytes" if v["bad"] else "error"
            else:
                lo, hi = min(v["gbps"]), max(v["gbps"])
                cell = f"{lo:.2f}" if hi - lo < 0.005 else f"{lo:.2f}-{hi:.2f}"
                ref = disk if c == "cold" else h2d
                if ref:
                    cell += f" ({statistics.median(v['gbps']) / ref:.0%})"
                if v["bad"] or v["errors"]:
                    cell += f" +{v['bad'] + v['errors']} failed"
            row += f" {cell:>22} |"
        lines.append(row)
    lines.append(
        "(%) page cache and tmpfs: of pinned host->device; cold: of the O_DIRECT disk reads"
    )
    ours = [r for r in res["runs"] if r["name"] in ("ours", "ours_module") and "error" not in r]
    if ours:
        rss = max(r["rss_anon_growth"] for r in ours)
        pinned = max((r.get("pinned_bytes") or 0) for r in ours)
        lines.append(
            f"tensorizer-rs: host RssAnon growth up to {rss / bl.MiB:.0f} MiB, pinned staging "
            + (f"{pinned / bl.MiB:.0f} MiB" if pinned else "- (CPU or not reported)")
        )
    if res.get("loaders_skipped"):
        lines.append(
            "skipped: " + ", ".join(f"{k} ({v})" for k, v in res["loaders_skipped"].items())
        )
    if res.get("skipped"):
        lines.append(f"{len(res['skipped'])} loads skipped for time")
    return lines


if __name__ == "__main__":
    main()
