"""What request pattern reaches a cold disk's ceiling, and how close our cold loads come to it.

On the GPU machine fastsafetensors read a cold file faster (2.7-2.9 GB/s) than 16 threads of
64 MiB O_DIRECT reads (1.9-2.3), the ceiling the other benchmarks measure. This sweeps the
readers' count and request size, O_DIRECT and buffered (caches dropped before each), then loads
a `.tensors` file of the same size cold to `cuda:0` with our loader under a few settings, each
in a fresh process. Needs root (drop_caches). Prints a table; writes disk-probe.json to --out.
O_DIRECT is read by Python threads, and with --c-reader (bench/direct_reader.c built) also by
C threads (Python's cannot issue 512 KiB requests fast enough: on the GPU machine's disk C
threads read them 28 % faster than 64 MiB ones, Python's slower); --sweep names the settings, --rounds repeats them interleaved,
--only-direct leaves out the buffered reads and our loads; --pages 4k,huge reads with C threads
into buffers on 4 KiB pages and on huge pages (our staging's kind), each its own row.

    python bench/disk_probe.py --dir /tmp/tzdisk --gib 6 --out $OUT
    python bench/disk_probe.py --dir /tmp/tzdisk --gib 4 --c-reader .device/bin/direct_reader \
        --sweep 16x512,16x4096,16x65536 --pages 4k,huge --rounds 2 --only-direct --out $OUT
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lib import GiB, MiB, disk_info, drop_caches, log, read_gbps

LOAD = """
import sys, time, torch
from tensorizer_rs import TensorDeserializer
path, readers = sys.argv[1], int(sys.argv[2])
torch.empty(1, device="cuda:0"); torch.cuda.synchronize()
kw = {"num_readers": readers} if readers else {}
t0 = time.perf_counter()
d = TensorDeserializer(path, device="cuda:0", **kw)
n = sum(d[k].numel() * d[k].element_size() for k in d)
torch.cuda.synchronize()
print(n / (time.perf_counter() - t0) / 1e9)
"""


def write_model(path: str, gib: float) -> None:
    import torch
    from tensorizer_rs import TensorSerializer

    g = torch.Generator().manual_seed(0)
    per = 256 * MiB // 2
    sd = {f"w{i}": torch.randn(per, generator=g).to(torch.bfloat16) for i in range(int(gib * 4))}
    with TensorSerializer(path) as s:
        s.write_state_dict(sd)
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--gib", type=float, default=6.0)
    ap.add_argument("--read-gib", type=float, default=3.0, help="bytes per raw-read setting")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--c-reader", help="bench/direct_reader.c built: O_DIRECT by C threads too")
    ap.add_argument(
        "--sweep",
        help="O_DIRECT settings THREADSxKIB,... (default: 8-64 threads x 4-64 MiB)",
    )
    ap.add_argument(
        "--pages",
        default="",
        help="the C reader's buffers: 4k,huge (each a setting of its own; default the system's)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="the O_DIRECT sweep, interleaved")
    ap.add_argument("--only-direct", action="store_true", help="no buffered reads, no loads")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    log(f"disk {disk_info(args.dir)}")
    path = os.path.join(args.dir, "cold.tensors")
    write_model(path, args.gib)
    limit = int(args.read_gib * GiB)
    rows = []

    def raw(direct: bool, threads: int, chunk: int, c: bool = False, pages: str = "") -> None:
        if not direct:
            drop_caches()
        gbps = read_gbps(path, threads, chunk, direct, limit, args.c_reader if c else None, pages)
        reader = " (C" + (f", {pages}" if pages else "") + ")" if c else ""
        kind = ("O_DIRECT" if direct else "buffered") + reader
        size = f"{chunk // MiB} MiB" if chunk >= MiB else f"{chunk >> 10} KiB"
        rows.append({"what": f"{kind} {threads} thr x {size}", "gbps": gbps})
        log(f"{rows[-1]['what']:<38} {rows[-1]['gbps']:6.2f} GB/s")

    if args.sweep:
        sweep = [tuple(int(x) for x in s.split("x")) for s in args.sweep.split(",")]
        sweep = [(t, kib << 10) for t, kib in sweep]
    else:
        sweep = list(itertools.product((8, 16, 32, 64), (4 * MiB, 16 * MiB, 64 * MiB)))
    for _ in range(args.rounds):
        for threads, chunk in sweep:
            raw(True, threads, chunk)
            if args.c_reader:
                for pages in args.pages.split(","):
                    raw(True, threads, chunk, c=True, pages=pages)
    if args.only_direct:
        loads = []
    else:
        loads = [("auto", 0), ("auto", 24), ("auto", 32), ("buffered", 0), ("buffered", 32)]
        for threads, chunk in itertools.product((16, 32), (4 * MiB, 16 * MiB)):
            raw(False, threads, chunk)
    for io, readers in loads:
        drop_caches()
        env = dict(os.environ, TENSORIZER_RS_IO=io)
        out = subprocess.run(
            [sys.executable, "-c", LOAD, path, str(readers)],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        gbps = float(out.stdout.split()[-1]) if out.returncode == 0 else None
        what = f"ours cold, io={io}, readers={readers or 'default'}"
        rows.append(
            {"what": what, "gbps": gbps, "stderr": out.stderr[-400:] if gbps is None else ""}
        )
        log(f"{what:<38} {gbps if gbps is None else round(gbps, 2)} GB/s")
    with open(os.path.join(args.out, "disk-probe.json"), "w") as f:
        json.dump(
            {
                "gib": args.gib,
                "disk": disk_info(args.dir),
                "read_gib": args.read_gib,
                "rows": rows,
                "finished": time.strftime("%F %T"),
            },
            f,
            indent=1,
        )
    os.remove(path)


if __name__ == "__main__":
    main()
