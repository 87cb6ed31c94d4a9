"""Figures for docs/robustness.md and docs/storage.md (issue 24), each case in fresh processes:

    python bench/bench_hostile.py names [--runs 3] [--coreweave .cache/tz-2.12.1]
    python bench/bench_hostile.py stall [--runs 5]

``names``: open (eager load) a file whose one tensor name has 32,000 path components, with
tensorizer-rs and with CoreWeave's tensorizer: seconds for the constructor and peak RSS (the
process's, and its growth over the RSS after ``import torch``).

``stall``: load a 64 MiB file (four 16 MiB tensors) to the CPU over HTTP from
tests/servers/http_server.py, where one ranged request stalls after 16 KiB while the others
flow (``/stallone/``), with the direct client and through reqwest; the same file without the
stall as the baseline. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEP = 32_000

_OPEN = """
import json, resource, sys, time
import torch
impl, path = sys.argv[1], sys.argv[2]
if impl == "tensorizer-rs":
    from tensorizer_rs import TensorDeserializer
else:
    from tensorizer import TensorDeserializer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
d = TensorDeserializer(path, device="cpu")
took = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([took, peak / 1024, (peak - before) / 1024]))
"""


def _make_deep(path: Path) -> None:
    import torch
    from tensorizer_rs import TensorSerializer

    sd: list = [torch.arange(4, dtype=torch.float32)]
    for _ in range(DEEP - 1):
        sd = [sd]
    with TensorSerializer(str(path)) as s:
        s.write_state_dict(sd)


def names(args) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "deep.tensors"
        _make_deep(path)
        print(f"{DEEP}-component name, {path.stat().st_size} bytes\n")
        print("| reader | open (s) | peak RSS (MiB) | growth over `import torch` (MiB) |")
        print("| --- | --- | --- | --- |")
        for impl in ("tensorizer-rs", "coreweave 2.12.1"):
            env = dict(os.environ)
            if impl.startswith("coreweave"):
                env["PYTHONPATH"] = args.coreweave
            for _ in range(args.runs):
                proc = subprocess.run(
                    [sys.executable, "-c", _OPEN, impl, str(path)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=False,
                )
                if proc.returncode != 0:
                    print(f"| {impl} | failed: {proc.stderr.strip().splitlines()[-1:]} | | |")
                    continue
                took, peak, grew = json.loads(proc.stdout.splitlines()[-1])
                print(f"| {impl} | {took:.3f} | {peak:.0f} | {grew:.0f} |")


_STALL = """
import json, os, sys, time
import torch
from tensorizer_rs import TensorDeserializer, _native
url, ref = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
d = TensorDeserializer(url, device="cpu")
took = time.perf_counter() - t0
r = TensorDeserializer(ref, device="cpu")
assert all(torch.equal(d[k], r[k]) for k in r.keys())
print(json.dumps([took, getattr(_native, "hedged_requests", lambda: None)()]))
"""


def stall(args) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from helpers import http_server
    from tensorizer_rs import TensorSerializer

    with tempfile.TemporaryDirectory() as d:
        g = torch.Generator().manual_seed(0)
        with TensorSerializer(f"{d}/m64.tensors") as s:
            s.write_state_dict({f"t{i}": torch.randn(4 << 20, generator=g) for i in range(4)})
        print("| client | mode | load (s), each run | re-issued requests |")
        print("| --- | --- | --- | --- |")
        for client in ("direct", "reqwest"):
            env = dict(os.environ, TENSORIZER_RS_HTTP_DIRECT="0" if client == "reqwest" else "1")
            for mode in ("data", "stallone"):
                times, hedged = [], []
                for run in range(args.runs):
                    with http_server(Path(d)) as base:
                        url = f"{base}/{mode}/m64.tensors?run={run}"
                        proc = subprocess.run(
                            [sys.executable, "-c", _STALL, url, f"{d}/m64.tensors"],
                            env=env,
                            capture_output=True,
                            text=True,
                            timeout=600,
                            check=True,
                        )
                    took, n = json.loads(proc.stdout.splitlines()[-1])
                    times.append(f"{took:.2f}")
                    hedged.append(str(n))
                print(f"| {client} | {mode} | {' '.join(times)} | {' '.join(hedged)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    n = sub.add_parser("names")
    n.add_argument("--runs", type=int, default=3)
    n.add_argument("--coreweave", default=str(REPO / ".cache" / "tz-2.12.1"))
    s = sub.add_parser("stall")
    s.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    {"names": names, "stall": stall}[args.what](args)


if __name__ == "__main__":
    main()
