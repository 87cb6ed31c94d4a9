#!/usr/bin/env python3
"""Remote load throughput over loopback, one command (results: docs/benchmarks.md).

    python3 bench/bench_remote.py --dir /local/disk --nginx PATH --s3s PATH [--gib 4]
        [--coreweave DIR] [--devices cpu,cuda] [--out DIR]

1. Writes a Llama-shaped bf16 model with our writer, serves it with nginx (HTTP, Range; and
   HTTPS with --tls DIR holding cert.pem/key.pem, made with `openssl` if missing) and uploads it to s3s-fs (an S3 server that checks SigV4) with our serializer (multipart upload,
   timed).
2. The servers' ceilings: a reference client of N parallel `curl` processes, each fetching one
   contiguous range to /dev/null (N = 8, 16, 32, best kept); for S3 the URL is presigned with
   botocore, as CoreWeave tensorizer does. With --kept DIR (a tmpfs such as /dev/shm) also
   curl writing its ranges into files there: a client that keeps the bytes in fresh memory,
   as a load into new CPU tensors must. With --client (bench/range_client.c built) also a bare
   C client's ceilings over HTTP, receiving into a scratch buffer, into fresh memory and into
   memory already faulted in.
3. Loads the model, each load in a fresh process, with ours (defaults) and CoreWeave tensorizer
   (if --coreweave names a directory holding it and its dependencies: defaults and
   num_readers=16) to each device, and prints GB/s and the ratio to the server's ceiling.

Everything runs on 127.0.0.1; the file stays in the page cache, so the servers are CPU-bound
like the clients: the figures compare software, not networks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 1 << 30
KEY, SECRET, BUCKET = "benchkey", "benchsecret-0123456789", "bench"

LOAD = r"""
import json, os, resource, sys, time
kind, uri, device, readers, storage = sys.argv[1:6]
import torch
if device.startswith("cuda"):
    torch.empty(1, device=device)  # CUDA start-up is not part of the load
kw = {} if readers == "-" else {"num_readers": int(readers)}
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def switches():  # context switches of the process: how often its threads slept and woke
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_nvcsw + r.ru_nivcsw
def threads():  # CPU seconds of the live threads, by name less its digits
    out, tck = {}, os.sysconf("SC_CLK_TCK")
    for t in os.listdir("/proc/self/task"):
        try:
            st = open(f"/proc/self/task/{t}/stat").read()
        except OSError:
            continue
        name = st[st.index("(") + 1 : st.rindex(")")].rstrip("0123456789")
        f = st[st.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0) + (int(f[11]) + int(f[12])) / tck
    return out
def cpu_split(before):
    now = threads()
    split = {k: round(v - before.get(k, 0), 3) for k, v in now.items() if v - before.get(k, 0) > 0.005}
    if kind == "ours" and device.startswith("cuda"):
        from tensorizer_rs import _cuda
        c = _cuda.counters()
        split["readers (ended)"] = round(c.get("reader_cpu_ns", 0) / 1e9, 3)
        split["pinning (ended)"] = round(c.get("pin_cpu_ns", 0) / 1e9, 3)
    return split
if kind == "ours" and os.environ.get("BENCH_PREPOOL") and device.startswith("cuda"):
    from tensorizer_rs import _cuda  # staging pool pinned before the clock starts
    _cuda.prewarm(torch.device(device), 64)
    time.sleep(1.0)
if kind == "ours" and os.environ.get("BENCH_PRECONN"):
    from concurrent.futures import ThreadPoolExecutor  # 32 connections open before the clock
    from tensorizer_rs.stream_io import open_stream
    def one(_):
        with open_stream(uri) as f:
            return len(f.read(1))
    with ThreadPoolExecutor(32) as ex:
        list(ex.map(one, range(32)))
def timeline(ev):
    # A load's timeline in ms from bench_start (TENSORIZER_RS_TRACE=1): when each phase began
    # and ended, how the readers' ends spread, the pieces' and requests' durations.
    t0 = next(e[0] for e in ev if e[2] == "bench_start")
    ms = lambda t: round((t - t0) / 1e6, 2)
    first, last, count = {}, {}, {}
    for t, _th, what, _a, _b in ev:
        first.setdefault(what, ms(t))
        last[what] = ms(t)
        count[what] = count.get(what, 0) + 1
    def spans(begin, end, key=lambda e: (e[1], e[3])):
        open_, out = {}, []
        for e in ev:
            if e[2] == begin:
                open_[key(e)] = e[0]
            elif e[2] == end and key(e) in open_:
                out.append((e[0] - open_.pop(key(e))) / 1e6)
        out.sort()
        if not out:
            return None
        return {"n": len(out), "min": round(out[0], 2), "median": round(out[len(out) // 2], 2),
                "max": round(out[-1], 2), "sum": round(sum(out), 1)}
    waits = [e[3] / 1e6 for e in ev if e[2] == "staging_wait"]
    ends = sorted(ms(e[0]) for e in ev if e[2] == "reader_end")
    return {
        "first": first, "last": last, "count": count,
        "pieces_ms": spans("piece", "piece_end"),
        "requests_ms": spans("http_request", "http_body_done"),
        "ttfb_ms": spans("http_request", "http_head"),
        "staging_wait_ms": round(sum(waits), 2),
        "reader_ends_ms": ends[:3] + ["..."] + ends[-3:] if len(ends) > 6 else ends,
    }
def vmstat():  # system-wide fault and huge-page counters (what fresh CPU tensors cost)
    keep = ("pgfault", "thp_fault_alloc", "thp_fault_fallback", "compact_stall")
    with open("/proc/vmstat") as f:
        return {k: int(v) for k, v in (line.split() for line in f) if k in keep}
c0, th0, vm0, sw0 = cpu(), threads(), vmstat(), switches()
if kind == "ours" and device.startswith("cuda"):
    from tensorizer_rs import _cuda
    _cuda.reset_counters()
TRACE = kind == "ours" and os.environ.get("TENSORIZER_RS_TRACE")
if TRACE:
    from tensorizer_rs import _native
    _native.trace_take()
    _native.trace_mark("bench_start")
t0 = time.perf_counter()
if kind == "ours":
    from tensorizer_rs import TensorDeserializer
    class Source:  # a URI with storage options, as open_stream's readers carry them
        _tensorizer_uri = uri
        _tensorizer_storage = json.loads(storage) if storage != "-" else None
    d = TensorDeserializer(Source(), device=device, **kw)
    t_open = time.perf_counter() - t0
    if TRACE:
        _native.trace_mark("bench_opened")
    n = sum(t.numel() * t.element_size() for t in d.values())
else:
    import tensorizer
    assert tensorizer.__version__, "CoreWeave tensorizer"
    from tensorizer import TensorDeserializer
    d = TensorDeserializer(uri, device=device, **kw)
    n = sum(t.numel() * t.element_size() for t in d.values())
if device.startswith("cuda"):
    torch.cuda.synchronize()
out = {"bytes": n, "seconds": time.perf_counter() - t0, "cpu_seconds": cpu() - c0}
out["switches"] = switches() - sw0
out["vmstat"] = {k: v - vm0.get(k, 0) for k, v in vmstat().items()}
if TRACE:
    _native.trace_mark("bench_end")
    raw = _native.trace_take()
    out["trace"] = timeline(raw)
    out["trace_raw"] = raw
out["cpu_split"] = cpu_split(th0)
if kind == "ours":
    out["constructor_seconds"] = t_open  # CPU loads run in the constructor, CUDA ones later
    if os.environ.get("BENCH_AGAIN"):  # a second load in the same process (warm connections)
        del d
        c0, th0 = cpu(), threads()
        if device.startswith("cuda"):
            _cuda.reset_counters()
        t0 = time.perf_counter()
        d = TensorDeserializer(Source(), device=device, **kw)
        n = sum(t.numel() * t.element_size() for t in d.values())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out["seconds_again"] = time.perf_counter() - t0
        out["cpu_seconds_again"] = cpu() - c0
        out["cpu_split_again"] = cpu_split(th0)
print("RESULT " + json.dumps(out))
"""


def log(*a):
    print(*a, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    for _ in range(400):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def tls_files(d: str) -> tuple[str, str, str] | None:
    """ca.pem, cert.pem and key.pem in `d`: a private CA and a certificate for 127.0.0.1 that it
    signed (rustls refuses a CA certificate as the server's own), made with `openssl` if
    missing; None if there are none and no openssl to make them."""
    d = os.path.abspath(d)
    ca, cakey, cert, key, csr = (
        os.path.join(d, f) for f in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem", "cert.csr")
    )
    if all(map(os.path.exists, (ca, cert, key))):
        return ca, cert, key
    if shutil.which("openssl") is None:
        return None
    os.makedirs(d, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ext = os.path.join(d, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n")
    steps = [
        ["req", "-x509", *ec, "-days", "7", "-subj", "/CN=bench CA", "-keyout", cakey, "-out", ca],
        ["req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", cakey, "-CAcreateserial"]
        + ["-days", "7", "-extfile", ext, "-out", cert],
    ]
    for step in steps:
        if subprocess.run(["openssl", *step], capture_output=True, check=False).returncode:
            return None
    return ca, cert, key


def start_nginx(
    binary: str, root: str, work: str, tls: tuple[str, str, str] | None = None
) -> tuple[subprocess.Popen, int, int]:
    """nginx serving `root` over HTTP (sendfile) and, given a certificate, HTTPS (TLS 1.3;
    nginx does not use sendfile for TLS). Returns the process and the two ports (0: none)."""
    port, tport = free_port(), free_port() if tls else 0
    https = (
        f"""
    server {{
        listen 127.0.0.1:{tport} ssl;
        ssl_certificate {tls[1]};
        ssl_certificate_key {tls[2]};
        ssl_protocols TLSv1.3;
        root {root};
    }}"""
        if tls
        else ""
    )
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"""daemon off;
worker_processes {len(os.sched_getaffinity(0))};
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}{https}
}}
"""
        )
    proc = subprocess.Popen(
        [binary, "-e", f"{work}/nginx-error.log", "-p", work, "-c", conf],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(work, "nginx-stderr.log"), "w"),  # noqa: SIM115
    )
    wait_port(port, proc, "nginx")
    if tport:
        wait_port(tport, proc, "nginx (TLS)")
    return proc, port, tport


def start_s3s(binary: str, root: str, work: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    os.makedirs(os.path.join(root, BUCKET), exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--host", "127.0.0.1", "--port", str(port), "--access-key", KEY]
        + ["--secret-key", SECRET, root],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(work, "s3s-stderr.log"), "w"),  # noqa: SIM115
    )
    wait_port(port, proc, "s3s-fs")
    return proc, port


CACERT: list[str] = []  # curl's --cacert for https:// (set in main)


def curl_parallel(url: str, size: int, n: int, keep: str | None = None) -> float:
    """GB/s of `n` concurrent curl processes, each fetching one contiguous range to /dev/null,
    or with `keep` (a tmpfs folder) into a file there: the bytes kept in fresh memory."""
    step = -(-size // n)
    outs = [os.path.join(keep, f"part{a}") if keep else "/dev/null" for a in range(0, size, step)]
    nginx0, kids0 = server_cpu("nginx"), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["curl", "-s", "-f", *CACERT, "-r", f"{a}-{min(a + step, size) - 1}", "-o", out] + [url]
        )
        for a, out in zip(range(0, size, step), outs)
    ]
    codes = [p.wait() for p in procs]
    dt = time.perf_counter() - t0
    if keep:
        for out in outs:
            os.unlink(out)
    if any(codes):
        raise RuntimeError(f"curl failed: {codes}")
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    curl_cpu = kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime
    log(
        f"curl x{n}{' to tmpfs' if keep else ''}: {size / dt / 1e9:.2f} GB/s in {dt:.3f} s, "
        f"cpu s curl+nginx {curl_cpu:.1f}+{server_cpu('nginx') - nginx0:.1f}"
    )
    return size / dt / 1e9


KEEP: list = []  # --kept: a tmpfs folder, for the ceiling of a client that keeps the bytes
CLIENT: dict = {}  # --client: bench/range_client.c built ("bin"), the served file ("file")
MODES = ("null", "fresh", "reused")  # range_client's destinations: scratch, new, faulted-in


def range_client(url: str, size: int, n: int, piece_mib: int, mode: str) -> dict:
    """bench/range_client.c: `n` threads fetching `piece_mib` MiB ranges (0: one per thread)
    into a scratch buffer (null), fresh memory (fresh) or memory already faulted in (reused)."""
    u = urllib.parse.urlsplit(url)
    nginx0 = server_cpu("nginx")
    out = subprocess.run(
        # One pass; its bytes are checked against the served file after the clock stops.
        [CLIENT["bin"], str(u.port), u.path, str(size), str(n), str(piece_mib), mode]
        + ["1", CLIENT["file"]],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    r = json.loads(out.stdout.splitlines()[-1])
    r["nginx_cpu_seconds"] = server_cpu("nginx") - nginx0
    log(
        f"range_client x{n} {piece_mib or 'whole'} MiB {mode}: {r['gbps']:.2f} GB/s, "
        f"cpu s {r['cpu_seconds']:.1f}+{r['nginx_cpu_seconds']:.1f}, {r['faults']} faults"
    )
    return r


def ratios(run: dict, ceil: dict) -> None:
    """A load's GB/s against the reference client's ceiling (and the kept-bytes one, if any)."""
    run["ratio"] = run["gbps"] / ceil["best"]
    if "best_kept" in ceil:
        run["ratio_kept"] = run["gbps"] / ceil["best_kept"]
    for mode in MODES:
        if f"best_client_{mode}" in ceil:
            run[f"ratio_client_{mode}"] = run["gbps"] / ceil[f"best_client_{mode}"]


def ceiling(url: str, size: int, client: bool = False) -> dict:
    """`curl`'s ceilings; with `client` (nginx over plain HTTP) also range_client's."""
    got = {f"curl x{n}": curl_parallel(url, size, n) for n in (8, 16, 32)}
    got["best"] = max(got.values())
    if KEEP:
        kept = {f"curl x{n} to tmpfs": curl_parallel(url, size, n, KEEP[0]) for n in (8, 16, 32)}
        got.update(kept, best_kept=max(kept.values()))
    if client and "bin" in CLIENT:
        runs = [
            range_client(url, size, n, piece, mode)
            for n, piece in ((16, 0), (32, 0), (16, 64))
            for mode in MODES
        ]
        got["client"] = runs
        for mode in MODES:
            got[f"best_client_{mode}"] = max(r["gbps"] for r in runs if r["mode"] == mode)
    return got


def presign(endpoint: str, key: str) -> str:
    import boto3
    from botocore.config import Config

    c = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    return c.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=3600
    )


def probe(url: str, size: int, mib: int = 8) -> list:
    """The reference client issuing what our loads issue: `n` curl processes, each fetching its
    share as consecutive `mib` MiB ranges on one kept-alive connection (`--next`), to /dev/null."""
    rows = []
    step = mib << 20
    for n in (16, 32):
        share = -(-size // n)
        t0 = time.perf_counter()
        procs = []
        for a in range(0, size, share):
            args = []
            for b in range(a, min(a + share, size), step):
                e = min(b + step, a + share, size) - 1
                args += [*(["--next"] if args else []), "-s", "-f", "-r", f"{b}-{e}"]
                args += ["-o", "/dev/null", url]
            procs.append(subprocess.Popen(["curl", *args]))
        codes = [p.wait() for p in procs]
        rows.append(
            {
                "curl_connections": n,
                "request_mib": mib,
                "ok": not any(codes),
                "gbps": size / (time.perf_counter() - t0) / 1e9,
            }
        )
        log(json.dumps(rows[-1]))
    return rows


def server_cpu(comm: str) -> float:
    """CPU seconds used so far by every process named `comm` (the server's workers)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        name, rest = st[st.index("(") + 1 : st.rindex(")")], st[st.rindex(")") + 2 :].split()
        if name == comm:
            total += int(rest[11]) + int(rest[12])
    return total / tick


def load(kind: str, uri: str, device: str, env: dict, readers="-", storage=None) -> dict:
    nginx0 = server_cpu("nginx")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD,
            kind,
            uri,
            device,
            readers,
            json.dumps(storage) if storage else "-",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=900,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["gbps"] = r["bytes"] / r["seconds"] / 1e9
            if "seconds_again" in r:
                r["gbps_again"] = r["bytes"] / r["seconds_again"] / 1e9
            r["nginx_cpu_seconds"] = server_cpu("nginx") - nginx0
            return r
    return {"error": (out.stderr or out.stdout)[-800:]}


def both_ceilings(urls: dict, tlsenv: dict, protos: set, size: int) -> dict:
    got = {}
    for proto in sorted(protos):
        CACERT[:] = ["--cacert", tlsenv["CURL_CA_BUNDLE"]] if proto == "https" else []
        got[proto] = ceiling(urls[proto], size, client=proto == "http")
    CACERT.clear()
    return got


def ab(res: dict, variants: list, local: str, urls: dict, tlsenv: dict, size: int, args) -> None:
    """Our HTTP(S) loads under each variant (key "proto": "https" for the TLS server),
    interleaved `--repeat` times, between ceilings."""
    with open(local, "rb") as f:  # page cache warm for the server
        while f.read(64 << 20):
            pass
    protos = {v.get("proto", "http") for v in variants}
    res["ceiling"] = both_ceilings(urls, tlsenv, protos, size)
    log(f"ceiling: {json.dumps(res['ceiling'])}")
    if args.probe:
        res["probe"] = [
            r for m in args.probe_mib.split(",") for r in probe(urls["http"], size, int(m))
        ]
    for k in range(args.repeat):
        for v in variants:
            proto = v.get("proto", "http")
            r = load(
                "ours",
                urls[proto],
                v.get("device", "cuda"),
                {**(tlsenv if proto == "https" else {}), **v.get("env", {})},
                v.get("readers", "-"),
                v.get("storage"),
            )
            r.update(
                loader="ours",
                proto=proto,
                label=v.get("label", ""),
                device=v.get("device", "cuda"),
                readers=v.get("readers", "-"),
                storage=v.get("storage"),
                round=k,
            )
            if "gbps" in r:
                ratios(r, res["ceiling"][proto])
            res["runs"].append(r)
            log(json.dumps(r))
    res["ceiling_after"] = both_ceilings(urls, tlsenv, protos, size)
    log(f"ceiling after: {json.dumps(res['ceiling_after'])}")
    log("| variant | device | GB/s (each round) | / ceiling (best) |\n|---|---|---|---:|")
    # A label given twice (to balance the order within a round) is one row.
    for v in {v.get("label", ""): v for v in variants}.values():
        rows = [r for r in res["runs"] if r["label"] == v.get("label", "")]
        c = res["ceiling"][v.get("proto", "http")]
        got = [r.get("gbps", float("nan")) for r in rows]
        again = [r["gbps_again"] for r in rows if "gbps_again" in r]
        cpu = [f"{r.get('cpu_seconds', 0):.1f}+{r.get('nginx_cpu_seconds', 0):.1f}" for r in rows]
        log(
            f"| {v.get('label', '')} | {v.get('device', 'cuda')} | "
            + " / ".join(f"{g:.2f}" for g in got)
            + (" (again " + " / ".join(f"{g:.2f}" for g in again) + ")" if again else "")
            + f" | {max(got) / c['best']:.0%}"
            + (f" (kept {max(got) / c['best_kept']:.0%})" if "best_kept" in c else "")
            + (
                f" (into fresh memory {max(got) / c['best_client_fresh']:.0%})"
                if "best_client_fresh" in c
                else ""
            )
            + " | cpu s ours+nginx "
            + ", ".join(cpu)
            + " |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--s3s", required=True)
    ap.add_argument("--coreweave", default=None)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--protos", default="http,https,s3", help="which servers to load from")
    ap.add_argument("--tls", default=None, help="folder for cert.pem/key.pem (HTTPS rows)")
    ap.add_argument("--sweep", action="store_true", help="also our HTTP loads at other settings")
    ap.add_argument(
        "--probe", action="store_true", help="curl issuing 8 MiB ranges, then our HTTP loads only"
    )
    ap.add_argument(
        "--variants",
        default=None,
        help="JSON list of our HTTP loads to A/B instead of the comparison: "
        '[{"label": ..., "device": ..., "env": {...}, "storage": {...}, "readers": "16"}]; '
        "run --repeat times, interleaved; no S3 server, no CoreWeave",
    )
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--kept",
        default=None,
        help="a tmpfs folder (e.g. /dev/shm): also the ceiling of curl writing its ranges into "
        "files there, a reference client that keeps the bytes in fresh memory",
    )
    ap.add_argument(
        "--client",
        default=None,
        help="bench/range_client.c built: also its ceilings over HTTP, receiving into a "
        "scratch buffer, into fresh memory (as a load into new tensors) and into memory "
        "already faulted in",
    )
    ap.add_argument(
        "--server-cpus",
        type=int,
        default=0,
        help="give the servers the first K CPUs and every client (curl, our loads) the rest, "
        "as if they ran on separate hosts (default: all share every CPU)",
    )
    ap.add_argument("--probe-mib", default="8", help="request sizes for --probe, e.g. 8,32")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.kept:
        KEEP.append(tempfile.mkdtemp(prefix="tzkept-", dir=args.kept))
    if args.client:
        CLIENT["bin"] = os.path.abspath(args.client)
    sys.path.insert(0, HERE)
    from bench_cpu import llama_like
    from tensorizer_rs import TensorSerializer

    www, s3root, work = (os.path.join(args.dir, d) for d in ("www", "s3", "work"))
    for d in (www, s3root, work):
        os.makedirs(d, exist_ok=True)
    res = {"cpus": os.cpu_count(), "gib": args.gib, "runs": []}
    variants = json.loads(args.variants) if args.variants else None
    protos = args.protos.split(",")
    tls = tls_files(args.tls or os.path.join(work, "tls")) if "https" in protos else None
    if "https" in protos and tls is None:
        log("no certificate and no openssl: HTTPS rows skipped")
        protos.remove("https")
    cpus = sorted(os.sched_getaffinity(0))
    if args.server_cpus:
        if not 0 < args.server_cpus < len(cpus):
            ap.error(f"--server-cpus must leave CPUs to the clients (there are {len(cpus)})")
        server, client = set(cpus[: args.server_cpus]), set(cpus[args.server_cpus :])
        res["server_cpus"], res["client_cpus"] = sorted(server), sorted(client)
        os.sched_setaffinity(0, server)  # the servers inherit it
    nginx, hport, tport = start_nginx(args.nginx, www, work, tls)
    use_s3 = "s3" in protos and not variants
    s3s, sport = start_s3s(args.s3s, s3root, work) if use_s3 else (None, 0)
    if args.server_cpus:
        os.sched_setaffinity(0, client)  # this process, curl and the loads
    endpoint = f"http://127.0.0.1:{sport}"
    s3env = {
        "S3_ACCESS_KEY_ID": KEY,
        "S3_SECRET_ACCESS_KEY": SECRET,
        "S3_ENDPOINT_URL": endpoint,
    }
    # CoreWeave reads the AWS chain (an http:// endpoint from the environment is allowed).
    cwenv = {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    urls = {
        "http": f"http://127.0.0.1:{hport}/model.tensors",
        "https": f"https://127.0.0.1:{tport}/model.tensors",
    }
    # Our loader reads requests' variable, CoreWeave's curl subprocesses curl's.
    tlsenv = {"REQUESTS_CA_BUNDLE": tls[0], "CURL_CA_BUNDLE": tls[0]} if tls else {}
    try:
        sd = llama_like(int(args.gib * GiB))
        local = os.path.join(www, "model.tensors")
        with TensorSerializer(local) as s:
            s.write_state_dict(sd)
        size = os.path.getsize(local)
        CLIENT["file"] = local
        if variants:
            del sd
            return ab(res, variants, local, urls, tlsenv, size, args)
        if use_s3:
            os.environ.update(s3env)
            t0 = time.perf_counter()
            with TensorSerializer(f"s3://{BUCKET}/model.tensors") as s:
                s.write_state_dict(sd)
            res["s3_upload_gbps"] = size / (time.perf_counter() - t0) / 1e9
            for k in s3env:
                os.environ.pop(k)
            log(f"S3 upload (ours, multipart) {res['s3_upload_gbps']:.2f} GB/s")
        del sd
        warm = [local] + ([os.path.join(s3root, BUCKET, "model.tensors")] if use_s3 else [])
        for path in warm:  # page cache warm for the servers
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
        log(f"model {size / GiB:.2f} GiB")
        http_url, https_url = urls["http"], urls["https"]
        web = {"http", "https"} & set(protos)
        res["ceiling"] = both_ceilings(urls, tlsenv, web, size)
        if args.coreweave:
            sys.path.insert(0, args.coreweave)
        if use_s3:
            try:
                res["ceiling"]["s3"] = ceiling(presign(endpoint, "model.tensors"), size)
            except ImportError as e:  # boto3 travels with CoreWeave's dependencies
                res["ceiling"]["s3"] = {"best": float("nan"), "error": str(e)}
        log(f"ceilings: {json.dumps(res['ceiling'])}")
        s3_uri = f"s3://{BUCKET}/model.tensors"
        cw = {
            "PYTHONPATH": os.pathsep.join(
                filter(None, [args.coreweave, os.environ.get("PYTHONPATH")])
            )
        }
        plan = []
        for device in args.devices.split(","):
            plan += [
                ("ours", "http", http_url, device, {}, "-"),
                ("ours", "https", https_url, device, tlsenv, "-"),
                ("ours", "s3", s3_uri, device, s3env, "-"),
            ]
            if args.coreweave:
                plan += [
                    ("coreweave", "http", http_url, device, cw, "-"),
                    ("coreweave", "http", http_url, device, cw, "16"),
                    ("coreweave", "https", https_url, device, {**cw, **tlsenv}, "-"),
                    ("coreweave", "https", https_url, device, {**cw, **tlsenv}, "16"),
                    # s3s-fs sends no Accept-Ranges, so CoreWeave refuses num_readers > 1 there.
                    ("coreweave", "s3", s3_uri, device, {**cw, **cwenv}, "-"),
                ]
        plan = [(*p, None) for p in plan if p[1] in protos]
        if args.probe:
            res["probe"] = [
                r for m in args.probe_mib.split(",") for r in probe(http_url, size, int(m))
            ]
            plan = [p for p in plan if p[0] == "ours" and p[1] == "http"]
        if args.sweep:
            for device in args.devices.split(","):
                for readers in ("8", "16", "32", "-"):
                    plan.append(("ours", "http", http_url, device, {}, readers, None))
        for kind, proto, uri, device, env, readers, storage in plan:
            r = load(kind, uri, device, env, readers, storage)
            r.update(loader=kind, proto=proto, device=device, readers=readers, storage=storage)
            if "gbps" in r:
                ratios(r, res["ceiling"][proto])
            res["runs"].append(r)
            log(json.dumps(r))
        res["ceiling_after"] = both_ceilings(urls, tlsenv, web, size)
    finally:
        if KEEP:
            shutil.rmtree(KEEP[0], ignore_errors=True)
        nginx.terminate()
        if s3s is not None:
            s3s.terminate()
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench-remote.json"), "w") as f:
            json.dump(res, f, indent=1)
    log("")
    log(f"model {args.gib} GiB bf16 over loopback, {os.cpu_count()} CPUs")
    log(
        "ceilings (parallel curl, best of 8/16/32 ranges): "
        + ", ".join(f"{p} {c['best']:.2f} GB/s" for p, c in res["ceiling"].items())
    )
    if KEEP:
        log(
            "kept in tmpfs (curl -o): "
            + ", ".join(f"{p} {c['best_kept']:.2f} GB/s" for p, c in res["ceiling"].items())
        )
    if "bin" in CLIENT:
        log(
            "range_client, best into scratch / fresh / reused memory: "
            + ", ".join(
                f"{p} {c['best_client_null']:.2f} / {c['best_client_fresh']:.2f} / "
                f"{c['best_client_reused']:.2f} GB/s"
                for p, c in res["ceiling"].items()
                if "best_client_fresh" in c
            )
        )
    log("| loader | proto | device | readers | GB/s | / ceiling | / kept | / fresh |")
    log("|---|---|---|---|---:|---:|---:|---:|")
    for r in res["runs"]:
        st = r.get("storage")
        readers = r["readers"] + (f", {json.dumps(st)}" if st else "")
        if "gbps" in r:
            kept = f"{r['ratio_kept']:.0%}" if "ratio_kept" in r else "-"
            fresh = f"{r['ratio_client_fresh']:.0%}" if "ratio_client_fresh" in r else "-"
            log(
                f"| {r['loader']} | {r['proto']} | {r['device']} | {readers} | "
                f"{r['gbps']:.2f} | {r['ratio']:.0%} | {kept} | {fresh} |"
            )
        else:
            log(
                f"| {r['loader']} | {r['proto']} | {r['device']} | {r['readers']} | error | "
                f"{r['error'][-200:]!r} |"
            )


if __name__ == "__main__":
    main()
