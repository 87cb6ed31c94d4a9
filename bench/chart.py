#!/usr/bin/env python3
"""Draws a benchmark's JSON as a bar chart (matplotlib), for people who would rather look than
read: GB/s per loader per column with the limits measured in the same run as lines.

    python3 bench/chart.py OUT/peers.json [-o peers.png]    # from peers_bench.py
    python3 bench/chart.py OUT/tp.json [-o tp.png]          # from tp_bench.py

The benchmarks call draw() themselves when matplotlib is importable; where it is not (the GPU
machine), fetch the JSON and run this here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

COLORS = ["#1f77b4", "#6baed6", "#d62728", "#ff7f0e", "#9467bd", "#2ca02c", "#98df8a", "#8c564b"]


def _bars(ax, groups, series, values, spread):
    """Grouped bars: `groups` along x, one bar per series in each; values[s][g] (None: no
    bar), spread[s][g] = (lo, hi) drawn as an error bar."""
    n = max(1, len(series))
    width = 0.8 / n
    for i, s in enumerate(series):
        xs, hs, lo, hi = [], [], [], []
        for g in range(len(groups)):
            v = values[s][g]
            if v is None:
                continue
            xs.append(g - 0.4 + width * (i + 0.5))
            hs.append(v)
            lo.append(v - spread[s][g][0])
            hi.append(spread[s][g][1] - v)
        if xs:
            ax.bar(xs, hs, width, label=s, color=COLORS[i % len(COLORS)], yerr=[lo, hi], capsize=2)
            for x, h in zip(xs, hs):
                ax.annotate(
                    f"{h:.1f}" if h >= 10 else f"{h:.2f}",
                    (x, h),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("GB/s")


def _limit(ax, y, label, style, x0=-0.5, x1=None, color="black"):
    if not y:
        return
    x1 = x1 if x1 is not None else len(ax.get_xticks()) - 0.5
    ax.hlines(y, x0, x1, colors=color, linestyles=style, linewidth=1.2)
    ax.annotate(
        f"{label} {y:.1f}" if y >= 10 else f"{label} {y:.2f}",
        (x0, y),
        xytext=(2, 2),
        textcoords="offset points",
        fontsize=7,
        color=color,
    )


def draw_peers(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    labels = {}
    cells: dict = {}
    for r in runs:
        if "error" in r or not r.get("check", {}).get("ok"):
            continue
        labels[r["name"]] = r["label"]
        cells.setdefault((r["label"], r["column"]), []).append(r["gbps"])
    series = list(dict.fromkeys(labels.values()))
    lim = res.get("limits", {})
    # Only the panels a run has bars for: `--columns cold` draws the cold one alone.
    panels = [
        (cols, titles)
        for cols, titles in (
            (["page", "tmpfs"], ["page cache (ext4)", "tmpfs (/dev/shm)"]),
            (["cold"], ["cold (caches dropped)"]),
        )
        if any(c in cols for _, c in cells)
    ]
    if not panels:
        return
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(12 if len(panels) == 2 else 7, 5),
        gridspec_kw={"width_ratios": [len(cols) for cols, _ in panels]},
        constrained_layout=True,
        squeeze=False,
    )
    into = "pinned" if res["args"]["device"].startswith("cuda") else "host memory"
    for ax, (cols, titles) in zip(axes[0], panels):
        vals = {s: [] for s in series}
        spread = {s: [] for s in series}
        for s in series:
            for c in cols:
                v = cells.get((s, c))
                vals[s].append(statistics.median(v) if v else None)
                spread[s].append((min(v), max(v)) if v else (0, 0))
        _bars(ax, titles, series, vals, spread)
        if cols == ["cold"]:
            _limit(ax, lim.get("odirect_gbps"), "O_DIRECT, 16 thr", "dashed")
        else:
            _limit(ax, lim.get("pinned_h2d_gbps"), "pinned host→device", "solid")
            _limit(
                ax,
                lim.get("page_read_gbps"),
                f"page cache→{into}, 16 thr",
                "dashed",
                -0.5,
                0.5,
                "dimgray",
            )
            _limit(
                ax,
                lim.get("tmpfs_read_gbps"),
                f"tmpfs→{into}, 16 thr",
                "dotted",
                0.5,
                1.5,
                "dimgray",
            )
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend and the labels
    axes[0][0].legend(fontsize=7, loc="upper left", ncol=2)
    m = res.get("model", {})
    gpu = (res.get("host", {}).get("gpus") or ["no GPU"])[0].split(",")[0]
    fig.suptitle(
        f"Loading a {m.get('bytes', 0) / 1e9:.2f} GB bf16 model to {res['args']['device']}, "
        f"fresh processes, bytes checked\n{gpu}, commit {res.get('commit')}",
        fontsize=10,
    )
    fig.savefig(path, dpi=150)
    plt.close(fig)


def draw_tp(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict = {}
    for r in res["rows"]:
        a = r.get("agg", {})
        if a.get("gbps") and a.get("checks_ok"):
            rows.setdefault((r["label"], r["cache"]), []).append(a["gbps"])
    labels = list(dict.fromkeys(k[0] for k in rows))
    caches = [c for c in ("page", "cold") if any(k[1] == c for k in rows)]
    fig, axes = plt.subplots(
        1,
        len(caches) or 1,
        figsize=(6 * max(1, len(caches)), 5),
        constrained_layout=True,
        squeeze=False,
    )
    lim = res.get("limits", {})
    for ax, c in zip(axes[0], caches):
        vals = {s: [statistics.median(rows[(s, c)])] if (s, c) in rows else [None] for s in labels}
        spread = {
            s: [(min(rows[(s, c)]), max(rows[(s, c)])) if (s, c) in rows else (0, 0)]
            for s in labels
        }
        _bars(ax, [f"{c} (aggregate)"], labels, vals, spread)
        if c == "page":
            _limit(
                ax, lim.get("h2d_nproc_gbps"), f"{res['ranks']} procs pinned host→device", "solid"
            )
            _limit(
                ax,
                lim.get("page_nproc_gbps"),
                f"{res['ranks']} procs page cache→pinned",
                "dashed",
                color="dimgray",
            )
        else:
            _limit(ax, lim.get("odirect_nproc_gbps"), f"{res['ranks']} procs O_DIRECT", "dashed")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    gpus = res.get("host", {}).get("gpus") or []
    where = f"{len(gpus)} x {gpus[0].split(',')[0]}" if gpus else "the CPU"
    fig.suptitle(
        f"Tensor parallel, {res['ranks']} ranks on {where}, commit {res.get('commit')}",
        fontsize=10,
    )
    fig.savefig(path, dpi=150)
    plt.close(fig)


def draw(res, path):
    (draw_tp if res.get("kind") == "tp" else draw_peers)(res, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args()
    with open(a.json) as f:
        res = json.load(f)
    out = a.out or os.path.splitext(a.json)[0] + ".png"
    draw(res, out)
    print(out)


if __name__ == "__main__":
    main()
