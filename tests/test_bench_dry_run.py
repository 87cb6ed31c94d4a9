"""The GPU benchmarks' orchestration, in their CPU dry runs: bench/peers_bench.py (us beside the
other loaders; page cache, tmpfs, cold), bench/tp_bench.py (issue 28: ranks loading their
shards at once, released by a barrier) and bench/gpu_bench.py --encrypted (issue 27: plaintext
against encrypted, warm, over HTTP and cold). A model is written with per-tensor checksums, each
load runs in fresh processes, and every loaded byte is checked against the manifest afterwards; the
checksum the checks rest on must see a moved chunk or a flipped bit, or they would prove nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, coreweave_dir

BENCH = REPO_ROOT / "bench"
sys.path.insert(0, str(BENCH))
import bench_lib


def run_bench(script: str, tmp_path: Path, *args: str, model_dir=None) -> tuple[str, dict]:
    out = tmp_path / "out"
    p = subprocess.run(
        [
            sys.executable,
            str(BENCH / script),
            "--dry-run",
            "--dir",
            str(model_dir or tmp_path / "d"),
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    name = {"peers_bench.py": "peers", "tp_bench.py": "tp", "gpu_bench.py": "bench"}[script]
    with open(out / f"{name}.json") as f:
        res = json.load(f)
    # The children's own output is kept beside the JSON.
    assert (out / f"{name}.log").stat().st_size > 0
    if name != "bench" and importlib.util.find_spec("matplotlib") is not None:
        assert (out / f"{name}.png").stat().st_size > 1000
    return p.stdout, res


def coreweave() -> str:
    d = coreweave_dir("2.12.1")
    if not (d / "tensorizer" / "__init__.py").is_file():
        pytest.fail(f"CoreWeave tensorizer 2.12.1 is not installed at {d} (scripts/setup-env.sh)")
    return str(d)


def test_peers_dry_run(tmp_path, direct_reader):
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    shm_dir = shm / f"tz-peers-test-{os.getpid()}"
    stdout, res = run_bench(
        "peers_bench.py", tmp_path,
        "--loaders", "ours,coreweave,instanttensor",
        "--columns", "tmpfs,cold",
        "--coreweave", coreweave(),
        "--shm-dir", str(shm_dir),
        "--c-reader", direct_reader,
        "--keep",
    )  # fmt: skip
    nbytes, ntensors = res["model"]["bytes"], res["model"]["tensors"]
    assert res["loaders_skipped"] == {"instanttensor": "needs CUDA"}
    got = {(r["name"], r["column"]) for r in res["runs"]}
    assert got == {(n, c) for n in ("ours", "coreweave") for c in ("tmpfs", "cold")}
    assert not res["skipped"]
    for r in res["runs"]:
        assert "error" not in r, r
        assert r["check"] == {"ok": True, "tensors": ntensors, "bytes": nbytes, "bad": []}, r
        assert r["bytes"] == nbytes and r["gbps"] > 0
        # tmpfs loads read the copies, cold ones the files on --dir.
        assert r["path"].startswith(str(shm_dir) if r["column"] == "tmpfs" else str(tmp_path))
    assert res["limits"]["tmpfs_read_gbps"] > 0
    # The disk under --dir is described, so cold figures from two hosts can be told apart.
    assert res["disk"]["fs"] and res["disk"]["mount"], res["disk"]
    assert "odirect_gbps" in res["limits"] or any("error" in k for k in res["limits"])
    # Two patterns (16 threads taking the next 64 MiB, and fastsafetensors' 512 KiB) on both
    # files, by Python and by C threads; the ceiling is the fastest read of the .tensors file,
    # whichever pattern or reader gave it.
    lim = res["limits"]
    for pat in ("16x64MiB", "16x512KiB", "c16x64MiB", "c16x512KiB"):
        assert any(k.startswith(f"odirect_{pat}_before_") for k in lim), (pat, lim)
    if "odirect_16x64MiB_before_gbps" in lim:
        assert lim["odirect_c16x512KiB_before_gbps"] > 0, lim
        probes = [
            v
            for k, v in lim.items()
            if k.startswith("odirect_") and "_st_" not in k and k.endswith("_gbps")
            and k != "odirect_gbps"
        ]  # fmt: skip
        assert len(probes) >= 4 and lim["odirect_gbps"] == max(probes), lim
    # The table is printed last: one row per loader, a cell per column.
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert rows[0].split("|")[2].strip() == "tmpfs" and len(rows) == 3
    assert rows[1].startswith("| tensorizer-rs ") and rows[2].startswith("| CoreWeave tensorizer ")
    # The tmpfs copies are gone; the model stays (--keep): the .safetensors file the peers read
    # holds the manifest's tensors too (the safetensors-based loaders need CUDA or are not here).
    assert not shm_dir.exists()
    from safetensors.torch import load_file

    manifest = bench_lib.read_manifest(res["model"]["manifest"])
    check = bench_lib.check_tensors(load_file(str(tmp_path / "d" / "model.safetensors")), manifest)
    assert check["ok"] and check["bytes"] == nbytes, check


def test_peers_probes_ceiling_reads_one_pattern_of_one_file(tmp_path, direct_reader):
    """--probes ceiling: between cold rounds only C threads' 16 x 512 KiB of the .tensors file."""
    _, res = run_bench(
        "peers_bench.py", tmp_path,
        "--loaders", "ours",
        "--columns", "cold",
        "--cold-rounds", "2",
        "--probes", "ceiling",
        "--c-reader", direct_reader,
    )  # fmt: skip
    assert {(r["name"], r["round"]) for r in res["runs"]} == {("ours", 0), ("ours", 1)}
    lim = res["limits"]
    probes = sorted(k for k in lim if k.startswith("odirect_") and k != "odirect_gbps")
    tags = ("before", "round2", "after")
    assert probes in (
        [f"odirect_c16x512KiB_{t}_gbps" for t in sorted(tags)],
        [f"odirect_c16x512KiB_{t}_error" for t in sorted(tags)],
    ), probes
    if "odirect_gbps" in lim:
        assert lim["odirect_gbps"] == max(lim[p] for p in probes), lim


def test_tp_dry_run_two_ranks_load_their_shards_at_once(tmp_path):
    """Issue 28's CI item: two processes loading two shards at once on the CPU give the
    manifests' bytes (plain and encrypted; in place, as vLLM loads: new tensors go through the
    same orchestration in the peers test)."""
    stdout, res = run_bench(
        "tp_bench.py", tmp_path, "--ranks", "2", "--loaders", "ours_module", "--rows", "page,enc"
    )
    assert res["ranks"] == 2 and res["devices"] == ["cpu", "cpu"]
    shard = res["model"]["shard_bytes"]
    assert len(shard) == 2 and shard[0] == shard[1] > 0
    labels = {(r["kind"], r["loader"]) for r in res["rows"]}
    assert labels == {("tp", "ours_module"), ("enc", "ours_module")}
    for row in res["rows"]:
        assert row["agg"]["checks_ok"] and row["agg"]["bytes"] == sum(shard), row
        assert [x["rank"] for x in row["results"]] == [0, 1]
        for rank, x in enumerate(row["results"]):
            assert x["check"]["ok"] and x["check"]["bytes"] == shard[rank], x
            assert f"model-rank-{rank:03d}." in x["path"]
            assert x["path"].endswith(".enc.tensors") == (row["kind"] == "enc")
    assert res["limits"]["page_nproc_gbps"] > 0
    assert any(
        line.startswith("| 2 ranks, encrypted: tensorizer-rs, in place")
        for line in stdout.splitlines()
    )


def test_gpu_bench_encrypted_dry_run(tmp_path):
    """Issue 27's rows in one run, on the CPU: plaintext and encrypted, new tensors and in
    place, warm (host decryption beside), over HTTP (nginx from the page cache) and cold (the
    files evicted with posix_fadvise before each load); every load's bytes checked against the
    manifest; the summary gives encrypted/plaintext and RssAnon growth per row."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    extra = ["--nginx", nginx] if nginx else []
    # nginx's workers (`nobody` when run as root) must reach the files: pytest's tmp_path sits
    # in a 0700 folder.
    d = Path(tempfile.mkdtemp(prefix="tz-gpuenc-"))
    d.chmod(0o755)
    try:
        stdout, res = run_bench(
            "gpu_bench.py", tmp_path, "--encrypted", "--rounds", "1", *extra, model_dir=d
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert res["gpu"] == "cpu (dry run)" and res["evict"] == "fadvise"
    nbytes, ntensors = res["model"]["bytes"], res["model"]["tensors"]
    assert res["model"]["file_bytes"]["enc"] > res["model"]["file_bytes"]["tensors"] > nbytes
    caches = ("warm", "HTTP", "cold") if nginx else ("warm", "cold")
    want = {
        f"{c}: {kind} {how}"
        for c in caches
        for kind in ("plain", "encrypted")
        for how in ("new", "in place")
    } | {"warm: encrypted new (host)"}
    assert {r["label"] for r in res["runs"]} == want and len(res["runs"]) == len(want)
    for r in res["runs"]:
        assert "error" not in r, r
        assert r["check"] == {"ok": True, "tensors": ntensors, "bytes": nbytes, "bad": []}, r
        assert r["bytes"] == nbytes and r["gbps"] > 0 and "rss_anon_growth" in r
        assert r["file"].endswith(".enc.tensors") == (": encrypted" in r["label"]), r
        assert r["file"].startswith("http://127.0.0.1:") == (r["cache"] == "HTTP"), r
    if not nginx:
        assert res["skipped"] == {"HTTP": "no --nginx"}
    else:
        assert not res["skipped"]
    # The summary, last: one row per cache and load, the ratio and both RSS growths.
    rows = {(x["cache"], x["load"]): x for x in res["summary"]}
    assert set(rows) == {(c, h) for c in caches for h in ("new", "in place")} | {
        ("warm", "new (host)")
    }
    for (cache, load), x in rows.items():
        assert x["ratio"] == pytest.approx(x["encrypted_gbps"] / x["plain_gbps"])
        assert x["plain_rss_anon_mib"] is not None and x["encrypted_rss_anon_mib"] is not None
        assert any(
            line.startswith(f"{cache} {load} ") and f"{x['ratio']:.1%}" in line
            for line in stdout.splitlines()
        ), (cache, load)
    assert f"checks: {len(want)} of {len(want)} loads gave the manifest's bytes" in stdout


def test_gpu_bench_dry_run_needs_encrypted(tmp_path):
    p = subprocess.run(
        [sys.executable, str(BENCH / "gpu_bench.py"), "--dry-run", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2 and "--dry-run runs only with --encrypted" in p.stderr


def test_checksum_sees_moved_and_flipped_bytes():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(3, 1000, generator=g).to(torch.bfloat16)
    c = bench_lib.checksum(t)
    assert bench_lib.checksum(t.clone()) == c
    swapped = torch.cat([t[1:2], t[0:1], t[2:]])  # the same bytes, two rows moved
    assert bench_lib.checksum(swapped) != c
    flipped = t.clone()
    flipped.view(torch.int16)[2, 999] ^= 1
    assert bench_lib.checksum(flipped) != c
    # Odd byte counts and empty tensors have checksums too.
    odd = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert bench_lib.checksum(odd) != bench_lib.checksum(torch.tensor([1, 3, 2], dtype=torch.uint8))
    bench_lib.checksum(torch.empty(0, dtype=torch.bfloat16))

    manifest = {"bytes": 6000, "tensors": [["w", [3, 1000], "bfloat16", 6000, c]]}
    assert bench_lib.check_tensors({"w": t}, manifest)["ok"]
    assert bench_lib.check_tensors({"w": flipped}, manifest)["bad"] == ["w: bytes differ"]
    bad = bench_lib.check_tensors({"w": t.reshape(1000, 3)}, manifest)["bad"]
    assert bad and "want (3, 1000) bfloat16" in bad[0]
    assert not bench_lib.check_tensors({}, manifest)["ok"]


def test_vllm_shard_shapes_split_the_whole_model():
    dims = bench_lib.DIMS["llama8b"]
    whole = dict(bench_lib.vllm_shard_shapes(2, dims, 1))
    for tp in (2, 4, 8):
        shard = dict(bench_lib.vllm_shard_shapes(2, dims, tp))
        assert shard.keys() == whole.keys()
        for name, shape in shard.items():
            full = whole[name]
            if "norm" in name:
                assert shape == full  # replicated
            elif "o_proj" in name or "down_proj" in name:
                assert (shape[0], shape[1] * tp) == full  # row parallel: split the input
            else:
                assert (shape[0] * tp, shape[1]) == full  # column / vocab parallel
    assert whole["model.layers.0.self_attn.qkv_proj.weight"] == (4096 + 2 * 1024, 4096)
    assert whole["lm_head.weight"] == (128256, 4096)  # already a multiple of 64
    with pytest.raises(ValueError):
        bench_lib.vllm_shard_shapes(1, dims, 3)
