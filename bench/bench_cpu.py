"""CPU load benchmark: a model-shaped bf16 file from page cache into CPU tensors with
tensorizer-rs, CoreWeave tensorizer and safetensors, each in a fresh process, in one run.

    python bench/bench_cpu.py [--gib 2] [--dir /tmp/bench] [--coreweave .cache/tz-2.12.1]

Prints a Markdown table; the page-cache read ceiling (parallel pread into one buffer) is
measured in the same run so the figures can be read as ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

LOADERS = {
    "tensorizer-rs": (
        "from tensorizer_rs import TensorDeserializer\n"
        "d = TensorDeserializer(PATH + '.tensors', device='cpu')\n"
        "n = touch(d)\n"
    ),
    "coreweave": (
        "from tensorizer import TensorDeserializer\n"
        "d = TensorDeserializer(PATH + '.tensors', device='cpu', num_readers=NUM_READERS)\n"
        "n = touch(d)\n"
    ),
    "safetensors": (
        "from safetensors.torch import load_file\n"
        "d = load_file(PATH + '.safetensors', device='cpu')\n"
        "n = touch(d)\n"
    ),
}

# Read one value per 4 KiB page, so loaders that map the file lazily (safetensors) pay for
# bringing the bytes in, like the others do.
TOUCH = (
    "def touch(d):\n"
    "    n = 0\n"
    "    for t in d.values():\n"
    "        flat = t.detach().reshape(-1).view(torch.uint8)\n"
    "        if flat.numel():\n"
    "            flat[::4096].sum()\n"
    "        n += flat.numel()\n"
    "    return n\n"
)

CEILING = r"""
import os, sys, time, threading
path, threads = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
buf = bytearray(size)
mv = memoryview(buf)
fd = os.open(path, os.O_RDONLY)
chunk = 64 << 20
def work(i):
    off = i * chunk
    while off < size:
        os.preadv(fd, [mv[off:off + min(chunk, size - off)]], off)
        off += threads * chunk
t0 = time.perf_counter()
ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
print(size / (time.perf_counter() - t0) / 1e9)
"""


def llama_like(total_bytes: int):
    """Tensor shapes of a Llama-style model scaled to `total_bytes` of bf16."""
    import torch

    h, inter = 4096, 14336
    layer = [
        ("q", (h, h)),
        ("k", (1024, h)),
        ("v", (1024, h)),
        ("o", (h, h)),
        ("gate", (inter, h)),
        ("up", (inter, h)),
        ("down", (h, inter)),
        ("ln1", (h,)),
        ("ln2", (h,)),
    ]
    per_layer = sum(math.prod(shape) for _, shape in layer) * 2
    sd, used, i = {}, 0, 0
    g = torch.Generator().manual_seed(0)
    while used + per_layer <= total_bytes:
        for name, shape in layer:
            sd[f"model.layers.{i}.{name}.weight"] = torch.randn(
                *shape, generator=g, dtype=torch.float32
            ).to(torch.bfloat16)
        used += per_layer
        i += 1
    rest = (total_bytes - used) // (2 * h)
    if rest:
        sd["model.embed_tokens.weight"] = torch.randn(rest, h, generator=g).to(torch.bfloat16)
    return sd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/tensorizer-bench")
    ap.add_argument(
        "--coreweave", default=os.path.join(os.path.dirname(__file__), "..", ".cache", "tz-2.12.1")
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loaders", default=None, help="comma-separated subset, e.g. tensorizer-rs")
    ap.add_argument(
        "--ours-env",
        default=None,
        help='JSON list of environments for extra tensorizer-rs rows, e.g. [{"X": "1"}]',
    )
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "model")
    if not os.path.exists(path + ".tensors"):
        from safetensors.torch import save_file
        from tensorizer_rs import TensorSerializer

        sd = llama_like(int(args.gib * (1 << 30)))
        with TensorSerializer(path + ".tensors") as s:
            s.write_state_dict(sd)
        save_file(sd, path + ".safetensors")
        del sd
    size = os.path.getsize(path + ".tensors")
    for ext in (".tensors", ".safetensors"):  # warm the page cache
        with open(path + ext, "rb") as f:
            while f.read(64 << 20):
                pass
    cpus = os.cpu_count() or 1
    ceiling = max(
        float(subprocess.check_output([sys.executable, "-c", CEILING, path + ".tensors", str(t)]))
        for t in sorted({1, cpus, 2 * cpus})
    )
    rows = []
    for name, code in LOADERS.items():
        if args.loaders and name not in args.loaders.split(","):
            continue
        env = dict(os.environ)
        if name == "coreweave":
            if not os.path.isdir(args.coreweave):
                continue
            env["PYTHONPATH"] = (
                os.path.abspath(args.coreweave) + os.pathsep + env.get("PYTHONPATH", "")
            )
        variants = [(name, code.replace("NUM_READERS", "None"), {})]
        if name == "coreweave":
            variants.append(
                (name + f" num_readers={2 * cpus}", code.replace("NUM_READERS", str(2 * cpus)), {})
            )
        if name == "tensorizer-rs" and args.ours_env:
            variants += [(f"{name} {e}", variants[0][1], e) for e in json.loads(args.ours_env)]
        for label, body, extra in variants:
            script = (
                f"import time, json, torch\nPATH = {path!r}\n{TOUCH}t0 = time.perf_counter()\n{body}"
                "print(json.dumps([n, time.perf_counter() - t0]))\n"
            )
            best = None
            for _ in range(args.repeat):
                out = subprocess.run(
                    [sys.executable, "-c", script],
                    env={**env, **extra},
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    break
                n, secs = json.loads(out.stdout.strip().splitlines()[-1])
                best = secs if best is None else min(best, secs)
            if best is not None:
                rows.append((label, n / best / 1e9))
    print(
        f"file: {size / (1 << 30):.2f} GiB, {os.cpu_count()} CPUs; page cache -> memory ceiling "
        f"(parallel preadv): {ceiling:.2f} GB/s\n"
    )
    print("| loader | GB/s | vs ceiling |\n|---|---:|---:|")
    for label, gbs in rows:
        print(f"| {label} | {gbs:.2f} | {gbs / ceiling:.0%} |")


if __name__ == "__main__":
    main()
