#!/usr/bin/env python3
"""Tensor parallel on one host (issue 28; results: docs/benchmarks.md; on the GPU machine:
`bash bench/on_device.sh tp`): N ranks load their shards onto their GPUs at the same moment, as
vLLM's workers do with tensor_parallel_size=N.

    python3 bench/tp_bench.py --dir /local/ext4/dir --out DIR [--ranks N] [--gib 9]
        [--coreweave DIR]
    python3 bench/tp_bench.py --dry-run --dir /tmp/x --out /tmp/o    # CPU, 2 ranks, tiny

1. Writes the N shards of a Llama-like bf16 model as vLLM shards it (bench_lib.vllm_shard_shapes:
   qkv_proj / gate_up_proj split by output, o_proj / down_proj by input, the vocabulary padded
   and split, norms replicated), as `model-rank-%03d.tensors` written as modules (what
   `tensorize_vllm_model` writes), an encrypted copy of each shard, and the whole model
   (TP=1) for the one-process comparison; each with per-tensor checksums.
2. Limits, in the same run: pinned host->device copies in N processes at once (rank r on
   cuda:r mod GPUs) and in one; page cache -> pinned reads in N processes at once (each its
   shard, cores/N threads each) and in one (16 threads); O_DIRECT reads likewise, cold.
3. Rows, each a group of fresh processes released together by a barrier (every process has its
   CUDA context, imports and, in place, its model before the release): N ranks with ours (new
   tensors; in place with load_into_module) and CoreWeave 2.12.1, from the page cache and cold
   (caches dropped before each group); N ranks loading the encrypted shards; one process loading
   the whole model (ours), for comparison. Every rank's bytes are checked against the
   checksums after the clock. Each rank gets RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE
   as vLLM's workers have them.
4. Reports per row: aggregate GB/s (all ranks' bytes over the span from the first start to the
   last end), its share of the N-process limit (page cache: the lower of N-process pinned
   host->device and page cache -> pinned; cold: N-process O_DIRECT), per-rank GB/s, the time
   from the release until the last rank is done, host RSS growth and pinned staging per rank.
   Writes tp.json and tp.log under --out; draws tp.png if matplotlib is there.

With one GPU the N ranks share cuda:0: that measures the host-side contention (readers, memory
bandwidth, pinned memory) against one process loading the whole model.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lib as bl

LOADERS = {
    "ours": "tensorizer-rs",
    "ours_module": "tensorizer-rs, in place",
    # The A/B arm of the N-ranks default: each rank sized as if alone (12 readers, full pool).
    "ours_alone": "tensorizer-rs, each rank as if alone",
    "coreweave": "CoreWeave tensorizer",
}
ROWS = ("page", "cold", "enc", "whole")


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="a directory on a local disk (ext4)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ranks", type=int, default=None, help="default: the GPUs if >1, else 4")
    ap.add_argument(
        "--gib", type=float, default=None, help="whole model, GiB (default 8.4: 16 layers, 9.1 GB)"
    )
    ap.add_argument("--device-type", choices=("cuda", "cpu"), default=None)
    ap.add_argument(
        "--loaders",
        default="ours,ours_module,coreweave",
        help=f"of {','.join(LOADERS)}",
    )
    ap.add_argument(
        "--rows",
        default=",".join(ROWS),
        help="page (N ranks, page cache), cold (N ranks, caches dropped), enc (N ranks, "
        "encrypted shards, page cache), whole (one process, the whole model, page cache and "
        "cold)",
    )
    ap.add_argument("--rounds", type=int, default=None, help="page cache rows (default 2)")
    ap.add_argument("--cold-rounds", type=int, default=None, help="default 2 (after the others)")
    ap.add_argument("--threads", type=int, default=None, help="limit readers per process")
    ap.add_argument("--budget", type=float, default=None, help="seconds (default 500)")
    ap.add_argument("--coreweave", default=None, help="a directory holding CoreWeave tensorizer")
    ap.add_argument("--evict", choices=("drop", "fadvise"), default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="the same orchestration on the CPU: 2 ranks, a tiny model, 1 round, files evicted "
        "with fadvise, not drop_caches",
    )
    a = ap.parse_args()
    dry = a.dry_run
    a.host = bl.host_info()
    a.gpus = 0 if dry else len(a.host.get("gpus") or [])
    a.device_type = a.device_type or ("cpu" if dry or not a.gpus else "cuda")
    a.ranks = a.ranks or (2 if dry or a.device_type == "cpu" else (a.gpus if a.gpus > 1 else 4))
    a.gib = a.gib if a.gib is not None else (0.03 if dry else 8.4)
    a.rounds = a.rounds if a.rounds is not None else (1 if dry else 2)
    a.cold_rounds = a.cold_rounds if a.cold_rounds is not None else (1 if dry else 2)
    a.budget = a.budget if a.budget is not None else (240 if dry else 500)
    a.evict = a.evict or ("fadvise" if dry or os.geteuid() != 0 else "drop")
    if a.ranks < 2:
        ap.error("--ranks must be 2 or more (one process is the 'whole' row)")
    a.threads = a.threads or max(1, min(16, (os.cpu_count() or 16) // a.ranks))
    a.dims = "tiny" if dry else "llama8b"
    return a


def main():
    a = parse()
    bl.on_sigterm()
    n = a.ranks
    cuda = a.device_type == "cuda"
    os.makedirs(a.dir, exist_ok=True)
    logf, jsonf, say = bl.run_log(a.out, "tp")
    budget = bl.Budget(a.budget)
    extra = [a.coreweave] if a.coreweave else []
    rows_wanted = [r for r in a.rows.split(",") if r]
    loaders = []
    for name in a.loaders.split(","):
        if name == "coreweave" and not bl_importable("tensorizer", extra):
            say("skip coreweave: tensorizer not importable (pass --coreweave DIR)")
            continue
        loaders.append(name)
    # CoreWeave decrypts with libnacl, which needs libsodium (not on the GPU machine).
    sodium = ctypes.util.find_library("sodium") is not None
    devices = [f"cuda:{r % a.gpus}" if cuda else "cpu" for r in range(n)]
    res = {
        "kind": "tp",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": bl.commit(),
        "host": a.host,
        "ranks": n,
        "devices": devices,
        "args": {k: v for k, v in vars(a).items() if k != "host"},
        "limits": {},
        "rows": [],
        "skipped": [],
    }

    def save():
        with open(jsonf, "w") as f:
            json.dump(res, f, indent=1)

    say(
        f"host {a.host}, commit {res['commit']}: {n} ranks on {devices}, loaders {loaders}, "
        f"rows {rows_wanted}, limit readers {a.threads}/process, budget {a.budget:.0f} s"
    )
    written = []
    try:
        # ---------------------------------------------------------------- the files
        dims = bl.DIMS[a.dims]
        layers = bl.layers_for(int(a.gib * bl.GiB), dims)
        shard_dir = os.path.join(a.dir, f"tp{n}")
        whole_dir = os.path.join(a.dir, "tp1")
        os.makedirs(shard_dir, exist_ok=True)
        files = [
            {
                "base": os.path.join(shard_dir, f"model-rank-{r:03d}"),
                "shapes": bl.vllm_shard_shapes(layers, dims, n),
                "seed": r + 1,
                "formats": ["tensors"] + (["enc"] if "enc" in rows_wanted else []),
            }
            for r in range(n)
        ]
        if "whole" in rows_wanted:
            os.makedirs(whole_dir, exist_ok=True)
            files.append(
                {
                    "base": os.path.join(whole_dir, "model-rank-000"),
                    "shapes": bl.vllm_shard_shapes(layers, dims, 1),
                    "seed": 1000,
                    "formats": ["tensors"],
                }
            )
        w = bl.run_one(
            {"job": "write", "device": devices[0], "files": files}, budget.timeout(), logf
        )
        if "error" in w:
            raise SystemExit(f"writing the model failed: {w['error']}")
        written = [shard_dir, whole_dir]
        shards = w["files"][:n]
        whole = w["files"][n] if "whole" in rows_wanted else None
        res["model"] = {
            "layers": layers,
            "dims": a.dims,
            "shard_bytes": [s["bytes"] for s in shards],
            "bytes": sum(s["bytes"] for s in shards),
            "whole_bytes": whole["bytes"] if whole else None,
            "tensors_per_shard": shards[0]["tensors"],
            "write_seconds": sum(f["seconds"] for s in w["files"] for f in s["formats"].values()),
        }
        res["fs"] = bl.fs_type(a.dir)
        say(
            f"wrote {n} shards of {shards[0]['bytes'] / 1e9:.2f} GB ({shards[0]['tensors']} "
            f"tensors each)"
            + (", an encrypted copy of each" if "enc" in rows_wanted else "")
            + (f" and the whole model ({whole['bytes'] / 1e9:.2f} GB)" if whole else "")
            + f" in {res['model']['write_seconds']:.0f} s"
        )
        plain = [s["formats"]["tensors"]["path"] for s in shards]
        enc = [s["formats"]["enc"]["path"] for s in shards] if "enc" in rows_wanted else []
        whole_path = whole["formats"]["tensors"]["path"] if whole else None
        every = plain + enc + ([whole_path] if whole_path else [])
        save()

        def env(rank, world):
            return {
                "RANK": rank,
                "LOCAL_RANK": rank,
                "WORLD_SIZE": world,
                "LOCAL_WORLD_SIZE": world,
            }

        def group(specs, label):
            t0 = time.monotonic()
            g = bl.run_group(specs, budget.timeout(), logf)
            budget.note(label, time.monotonic() - t0)
            return g

        # ---------------------------------------------------------------- limits
        lim = res["limits"]
        bl.warm(every)
        if cuda:
            g = group([{"job": "h2d", "device": devices[0]}], "h2d1")
            lim["h2d_1proc_gbps"] = g["results"][0].get("median_copy_gbps")
            g = group(
                [
                    {
                        "job": "h2d",
                        "device": devices[r],
                        "bytes": 2 * bl.GiB,
                        "repeat": 4,
                        "rank": r,
                    }
                    for r in range(n)
                ],
                "h2dn",
            )
            lim["h2d_nproc_gbps"] = bl.aggregate(g).get("gbps")
            lim["h2d_nproc_ranks"] = [x.get("gbps") for x in g["results"]]

        def reads(paths, threads, chunk, direct, tag):
            g = group(
                [
                    {
                        "job": "read",
                        "device": devices[r % n],
                        "path": p,
                        "threads": threads,
                        "chunk": chunk,
                        "direct": direct,
                        "pinned": cuda and not direct,
                        "rank": r,
                    }
                    for r, p in enumerate(paths)
                ],
                tag,
            )
            errs = [x["error"] for x in g["results"] if "error" in x]
            if errs:
                lim[tag + "_error"] = errs[0][-500:]
            return bl.aggregate(g).get("gbps")

        if whole_path:
            lim["page_1proc_gbps"] = reads([whole_path], 16, 8 * bl.MiB, False, "page_1proc")
        lim["page_nproc_gbps"] = reads(plain, a.threads, 8 * bl.MiB, False, "page_nproc")
        say(f"limits: {lim}")
        save()

        def cold_limits():
            if whole_path:
                bl.evict(every, a.evict)
                lim["odirect_1proc_gbps"] = reads(
                    [whole_path], 16, 64 * bl.MiB, True, "odirect_1proc"
                )
            bl.evict(every, a.evict)
            lim["odirect_nproc_gbps"] = reads(plain, a.threads, 64 * bl.MiB, True, "odirect_nproc")
            say(
                f"O_DIRECT: 1 process {lim.get('odirect_1proc_gbps')}, {n} processes "
                f"{lim.get('odirect_nproc_gbps')} GB/s"
            )
            save()

        # ---------------------------------------------------------------- rows
        def row(kind, loader, cache, rnd):
            label = {
                "tp": f"{n} ranks: {LOADERS[loader]}",
                "enc": f"{n} ranks, encrypted: {LOADERS[loader]}",
                "whole": f"1 process, whole model: {LOADERS[loader]}",
            }[kind]
            key = (kind, loader, cache)
            nbytes = res["model"]["bytes"]
            guess = 20 + (nbytes / 1e9 if cache == "cold" else nbytes / 3e9)
            if not budget.fits(key, guess):
                res["skipped"].append({"row": label, "cache": cache, "round": rnd})
                say(f"  {cache:4s} {label:48s} skipped (time budget)")
                return
            if kind == "whole":
                paths, world = [whole_path], 1
                manifests = [whole["manifest"]]
            else:
                paths, world = (enc if kind == "enc" else plain), n
                manifests = [s["manifest"] for s in shards]
            if cache == "cold":
                bl.evict(every, a.evict)
            alone = {"TENSORIZER_RS_LOCAL_RANKS": 1} if loader == "ours_alone" else {}
            specs = [
                {
                    "job": "load",
                    "loader": "ours" if loader == "ours_alone" else loader,
                    "path": p,
                    "manifest": m,
                    "device": devices[r],
                    "encrypted": kind == "enc",
                    "extra_path": extra,
                    "rank": r,
                    "env": {**env(r, world), **alone},
                }
                for r, (p, m) in enumerate(zip(paths, manifests))
            ]
            g = group(specs, key)
            agg = bl.aggregate(g)
            rs = g["results"]
            ok = [x for x in rs if "error" not in x]
            out = {
                "label": label,
                "kind": kind,
                "loader": loader,
                "cache": cache,
                "round": rnd,
                "agg": agg,
                "rss_anon_growth_max": max((x["rss_anon_growth"] for x in ok), default=None),
                "pinned_bytes_max": max((x.get("pinned_bytes") or 0 for x in ok), default=0)
                or None,
                "results": rs,
            }
            res["rows"].append(out)
            save()
            errs = [x["error"] for x in rs if "error" in x]
            bad = [x["check"]["bad"] for x in ok if not x["check"]["ok"]]
            if errs:
                say(f"  {cache:4s} {label:48s} ERROR (rank) {errs[0][-300:]}")
            else:
                say(
                    f"  {cache:4s} {label:48s} {agg['gbps']:7.2f} GB/s aggregate, ranks "
                    + " ".join(f"{x:.2f}" for x in agg["rank_gbps"])
                    + f", last done {agg['last_done']:.2f} s, check "
                    + ("ok" if not bad else f"FAILED {bad[0]}")
                )

        def rotated(rnd):  # no loader always first
            k = rnd % max(1, len(loaders))
            return loaders[k:] + loaders[:k]

        # The page cache rows first (the files are still cached from writing), cold rows last.
        for rnd in range(a.rounds if {"page", "enc", "whole"} & set(rows_wanted) else 0):
            say(f"round {rnd + 1}: page cache (warmed in {bl.warm(every):.1f} s)")
            for loader in rotated(rnd):
                if "page" in rows_wanted:
                    row("tp", loader, "page", rnd)
                if "whole" in rows_wanted and loader in ("ours", "ours_module"):
                    row("whole", loader, "page", rnd)
                if "enc" in rows_wanted and (loader != "coreweave" or sodium):
                    row("enc", loader, "page", rnd)
        for rnd in range(a.cold_rounds if "cold" in rows_wanted else 0):
            if rnd == 0:
                cold_limits()
            say(f"round {rnd + 1}: cold ({a.evict} before each group)")
            for loader in rotated(rnd):
                row("tp", loader, "cold", rnd)
                if "whole" in rows_wanted and loader == "ours":
                    row("whole", loader, "cold", rnd)
        if "enc" in rows_wanted and "coreweave" in loaders and not sodium:
            res["skipped"].append({"row": "encrypted CoreWeave", "why": "no libsodium here"})
        res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        save()
    finally:
        if not a.keep:
            for d in written:
                shutil.rmtree(d, ignore_errors=True)
    bl.finish(res, table(res), "tp", logf, jsonf, say)


def bl_importable(module, extra):
    import importlib.machinery

    return importlib.machinery.PathFinder.find_spec(module, sys.path + extra) is not None


def _f(x, fmt="{:.1f}"):
    return fmt.format(x) if x else "-"


def table(res) -> list:
    lim = res["limits"]
    n = res["ranks"]
    page_ref = min([v for v in (lim.get("h2d_nproc_gbps"), lim.get("page_nproc_gbps")) if v] or [0])
    one_ref = lim.get("h2d_1proc_gbps") or lim.get("page_1proc_gbps")
    gpus = res["host"].get("gpus") or ["no GPU"]
    m = res.get("model", {})
    lines = [
        "",
        (
            f"{gpus[0]} x{len(res['host'].get('gpus') or [])} | {res['host'].get('cpus')} CPUs | "
            f"commit {res['commit']} | {n} ranks on {', '.join(sorted(set(res['devices'])))} | "
            f"shards {m.get('bytes', 0) / 1e9:.2f} GB in all, bytes checked"
        ),
        (
            f"limits: pinned H2D 1 process {_f(lim.get('h2d_1proc_gbps'))}, {n} processes "
            f"{_f(lim.get('h2d_nproc_gbps'))} GB/s; page cache -> pinned 1 process (16 thr) "
            f"{_f(lim.get('page_1proc_gbps'))}, {n} processes ({res['args']['threads']} thr each) "
            f"{_f(lim.get('page_nproc_gbps'))}; O_DIRECT 1 process {_f(lim.get('odirect_1proc_gbps'), '{:.2f}')}, "
            f"{n} processes {_f(lim.get('odirect_nproc_gbps'), '{:.2f}')}"
        ),
        f"| {'row':<48} | cache | {'GB/s':>12} | limit | {'per rank GB/s':>22} | last done | RssAnon+ | pinned |",
        "|"
        + "-" * 50
        + "|-------|"
        + "-" * 13
        + ":|------:|"
        + "-" * 23
        + ":|----------:|---------:|-------:|",
    ]
    groups: dict = {}
    for r in res["rows"]:
        groups.setdefault((r["label"], r["cache"]), []).append(r)
    for (label, cache), rs in groups.items():
        good = [r for r in rs if r["agg"].get("gbps") and r["agg"].get("checks_ok")]
        failed = len(rs) - len(good)
        if not good:
            lines.append(f"| {label:<48} | {cache:<5} | {'failed':>12} |")
            continue
        g = [r["agg"]["gbps"] for r in good]
        whole = good[0]["kind"] == "whole"
        if cache == "cold":
            ref = lim.get("odirect_1proc_gbps" if whole else "odirect_nproc_gbps")
        else:
            ref = one_ref if whole else page_ref
        ranks = [x for r in good for x in r["agg"]["rank_gbps"] if x]
        last = [r["agg"]["last_done"] for r in good]
        rss = max(r["rss_anon_growth_max"] or 0 for r in good)
        pinned = max(r["pinned_bytes_max"] or 0 for r in good)
        cell = f"{min(g):.2f}" if len(g) == 1 else f"{min(g):.2f}-{max(g):.2f}"
        lines.append(
            f"| {label:<48} | {cache:<5} | {cell:>12} | "
            + (f"{sum(g) / len(g) / ref:5.0%}" if ref else "    -")
            + f" | {f'{min(ranks):.2f}-{max(ranks):.2f}':>22} | {min(last):6.2f} s  | "
            f"{rss / bl.MiB:6.0f}Mi | "
            + (f"{pinned / bl.MiB:4.0f}Mi" if pinned else "     -")
            + " |"
            + (f" ({failed} failed)" if failed else "")
        )
    lines.append(
        f"limit: page cache rows of {n} ranks against the lower of {n}-process pinned H2D and "
        f"page cache -> pinned; one process against its own; cold against O_DIRECT"
    )
    if res.get("skipped"):
        lines.append(f"skipped: {res['skipped']}")
    return lines


if __name__ == "__main__":
    main()
