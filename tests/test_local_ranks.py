"""Tensor-parallel ranks on one host (issue 28): two processes, each told it is one of two
local ranks (``LOCAL_WORLD_SIZE=2``, as vLLM's workers are), released together, each load its
own shard at the same moment on the CPU and get exactly the bytes the manifest written beside
the shards says."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from tensorizer_rs import TensorSerializer

CHILD = r"""
import hashlib, json, os, sys, time
from pathlib import Path
from tensorizer_rs import TensorDeserializer

shard, gate = sys.argv[1], Path(sys.argv[2])
(gate / f"ready-{os.environ['LOCAL_RANK']}").touch()
deadline = time.monotonic() + 60
while not (gate / "go").exists():
    if time.monotonic() > deadline:
        sys.exit("never released")
    time.sleep(0.002)
with TensorDeserializer(shard, device="cpu") as d:
    got = {k: hashlib.sha256(v.contiguous().view(-1).view(dtype=__import__("torch").uint8)
                             .numpy().tobytes()).hexdigest() for k, v in d.items()}
print(json.dumps({"sha256": got}))
"""


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _shards(tmp: Path, ranks: int) -> tuple[list[str], dict]:
    """A layer split as tensor parallelism splits it: column-parallel weights by output rows,
    row-parallel ones by input columns, norms replicated; one file per rank and a manifest."""
    g = torch.Generator().manual_seed(28)
    full = {
        "qkv_proj.weight": torch.randn(3 * 512, 1024, generator=g).to(torch.bfloat16),
        "o_proj.weight": torch.randn(1024, 512, generator=g).to(torch.bfloat16),
        "gate_up_proj.weight": torch.randn(2 * 1536, 1024, generator=g).to(torch.bfloat16),
        "down_proj.weight": torch.randn(1024, 1536, generator=g).to(torch.bfloat16),
        "input_layernorm.weight": torch.randn(1024, generator=g),
    }
    paths, manifest = [], {}
    for r in range(ranks):
        shard = {}
        for k, v in full.items():
            if k.startswith(("qkv", "gate_up")):
                shard[k] = v.chunk(ranks, dim=0)[r].clone()
            elif k.startswith(("o_proj", "down")):
                shard[k] = v.chunk(ranks, dim=1)[r].clone()
            else:
                shard[k] = v.clone()
        p = str(tmp / f"model-rank-{r:03d}.tensors")
        s = TensorSerializer(p)
        s.write_state_dict(shard)
        s.close()
        paths.append(p)
        manifest[p] = {k: _digest(v) for k, v in shard.items()}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    return paths, manifest


def test_two_local_ranks_load_their_shards_at_once(tmp_path):
    ranks = 2
    paths, _ = _shards(tmp_path, ranks)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    gate = tmp_path / "gate"
    gate.mkdir()
    env = dict(os.environ)
    env.pop("TENSORIZER_RS_LOCAL_RANKS", None)
    procs = []
    for r, p in enumerate(paths):
        e = {**env, "LOCAL_WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r), "RANK": str(r)}
        e["WORLD_SIZE"] = str(ranks)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, p, str(gate)],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 120
    while not all((gate / f"ready-{r}").exists() for r in range(ranks)):
        assert time.monotonic() < deadline, [p.poll() for p in procs]
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (gate / "go").touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-4000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for p, got in zip(paths, outs):
        assert got["sha256"] == manifest[p], p
