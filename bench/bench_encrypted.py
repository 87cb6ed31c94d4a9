"""Encrypted vs plain load throughput, one command (issue: encryption must not make loads slow).

    python bench/bench_encrypted.py --dir /local/disk [--gib 8] [--devices cpu,cuda]

Writes one Llama-shaped bf16 model twice with our writer (plain, and encrypted with a random
raw key), warms the page cache, then loads each in a fresh process with default settings and
prints GB/s. CUDA context start-up is excluded; everything else (constructor, allocation,
reads, decryption, copies) is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

LOAD = r"""
import json, sys, time, torch
from tensorizer_rs import TensorDeserializer, DecryptionParams
path, device, key, readers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
enc = DecryptionParams.from_key(bytes.fromhex(key)) if key != "-" else None
kw = {"num_readers": int(readers)} if readers != "-" else {}
if device.startswith("cuda"):
    torch.empty(1, device=device)  # CUDA context start-up is not part of the load
t0 = time.perf_counter()
d = TensorDeserializer(path, device=device, encryption=enc, **kw)
n = sum(t.numel() * t.element_size() for t in d.values())
if device.startswith("cuda"):
    torch.cuda.synchronize()
print(json.dumps(n / (time.perf_counter() - t0) / 1e9))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--devices", default="cpu,cuda")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from bench_cpu import llama_like
    from tensorizer_rs import EncryptionParams, TensorSerializer

    os.makedirs(args.dir, exist_ok=True)
    plain, secret = (
        os.path.join(args.dir, "plain.tensors"),
        os.path.join(args.dir, "secret.tensors"),
    )
    enc = EncryptionParams.random()
    sd = llama_like(int(args.gib * (1 << 30)))
    for path, e in ((plain, None), (secret, enc)):
        with TensorSerializer(path, encryption=e) as s:
            s.write_state_dict(sd)
    del sd
    for path in (plain, secret):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass

    def run(path, device, key, readers="-", env=None):
        out = subprocess.run(
            [sys.executable, "-c", LOAD, path, device, key, readers],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **(env or {})},
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    for device in args.devices.split(","):
        p = max(run(plain, device, "-") for _ in range(2))
        s = max(run(secret, device, enc.key.hex()) for _ in range(2))
        rows.append((device, p, s))
    # One core: one reader and a one-thread rayon pool, so reads and decryption share a core.
    one = {"RAYON_NUM_THREADS": "1"}
    p1 = max(run(plain, "cpu", "-", "1", one) for _ in range(2))
    s1 = max(run(secret, "cpu", enc.key.hex(), "1", one) for _ in range(2))
    # Decryption alone per core: the encrypted load's time less the plain load's.
    d1 = 1 / (1 / s1 - 1 / p1) if s1 < p1 else float("inf")
    print(f"model {args.gib} GiB bf16, {os.cpu_count()} CPUs, page cache warm, default settings")
    print("| target | plain GB/s | encrypted GB/s | encrypted / plain |\n|---|---:|---:|---:|")
    for device, p, s in rows:
        print(f"| {device} | {p:.2f} | {s:.2f} | {s / p:.0%} |")
    print(f"| cpu, one core | {p1:.2f} | {s1:.2f} | {s1 / p1:.0%} |")
    print(f"\ndecryption alone, one core: {d1:.2f} GB/s (one-core encrypted time less plain time)")


if __name__ == "__main__":
    main()
