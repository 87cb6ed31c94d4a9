"""On a real GPU: loads from a tmpfs file take the memory-backed path (issue 26), ranks of one
host share the defaults and run their readers on their GPU's NUMA node (issue 28). Every
byte is checked; the load's stats (``cuda_load_stats``) prove which path ran."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tensorizer_rs import TensorDeserializer, TensorSerializer

pytestmark = pytest.mark.gpu


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (/proc/mounts, longest match)."""
    path, best, kind = Path(path).resolve(), -1, ""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2:
                mnt = Path(parts[1].replace("\\040", " "))
                if (path == mnt or mnt in path.parents) and len(str(mnt)) > best:
                    best, kind = len(str(mnt)), parts[2]
    return kind


def _tmpfs() -> Path:
    if _fs_type(Path("/dev/shm")) != "tmpfs":
        pytest.skip("/dev/shm is not tmpfs here")
    return Path("/dev/shm")


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        f"layers.{k}.w": torch.randn(2048, 2048, generator=g).to(torch.bfloat16) for k in range(24)
    }
    sd["norm"] = torch.randn(2048, generator=g)
    sd["odd"] = torch.randn(333_333, generator=g)
    return sd  # 201 MB: more 64 MiB pieces and segments than any default has readers


def _write(path, sd) -> str:
    s = TensorSerializer(str(path))
    s.write_state_dict(sd)
    s.close()
    return str(path)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _stats(d) -> list:
    loads = d.cuda_load_stats["loads"]
    assert loads, "no CUDA load ran"
    return loads


@pytest.fixture
def shm_dir():
    with tempfile.TemporaryDirectory(dir=_tmpfs(), prefix="tz-gpu-") as d:
        yield Path(d)


def test_tmpfs_new_tensors_and_in_place(shm_dir, tmp_path):
    sd = _state(1)
    path = _write(shm_dir / "m.tensors", sd)
    d = TensorDeserializer(path, device="cuda:0")
    for k, v in sd.items():
        assert torch.equal(d[k].cpu(), v), k
    for s in _stats(d):
        assert (s["fs"], s["read_mode"], s["direct_read_bytes"]) == ("tmpfs", "buffered", 0), s
        # tmpfs keeps the page cache's readers, two buffers each (docs/benchmarks.md).
        assert s["load_buffers"] == 2 * s["readers"], s
    d.close()

    # In place: a module holding tensors of the right shapes on the GPU.
    named = {k.replace(".", "_"): v for k, v in sd.items()}
    src, m = torch.nn.Module(), torch.nn.Module()
    for k, v in named.items():
        src.register_buffer(k, v)
        m.register_buffer(k, torch.zeros_like(v, device="cuda:0"))
    s = TensorSerializer(str(shm_dir / "module.tensors"))
    s.write_module(src)
    s.close()
    path = str(shm_dir / "module.tensors")
    ptrs = {k: v.data_ptr() for k, v in m.state_dict().items()}
    d = TensorDeserializer(path, device="cuda:0")
    d.load_into_module(m)
    for k, v in m.state_dict().items():
        assert v.data_ptr() == ptrs[k] and torch.equal(v.cpu(), named[k]), k
    for s in _stats(d):
        assert (s["fs"], s["read_mode"], s["direct_read_bytes"]) == ("tmpfs", "buffered", 0), s

    # The same file on the disk keeps the page-cache path.
    if _fs_type(tmp_path) == "tmpfs":
        return
    disk = _write(tmp_path / "m.tensors", sd)
    d = TensorDeserializer(disk, device="cuda:0")
    for k, v in sd.items():
        assert torch.equal(d[k].cpu(), v), k
    for s in _stats(d):
        assert s["fs"] != "tmpfs" and s["read_mode"] == "auto", s
        assert s["load_buffers"] == 2 * s["readers"], s


def _sysfs_node(device: int) -> int | None:
    p = torch.cuda.get_device_properties(device)
    bus = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
    try:
        n = int(Path(f"/sys/bus/pci/devices/{bus}/numa_node").read_text())
    except OSError:
        return None
    return n if n >= 0 else None


def _online_nodes() -> int:
    try:
        text = Path("/sys/devices/system/node/online").read_text().strip()
    except OSError:
        return 1
    count = 0
    for part in text.split(","):
        a, _, b = part.partition("-")
        count += int(b or a) - int(a) + 1
    return count


def test_readers_on_the_gpus_numa_node(tmp_path):
    sd = _state(2)
    path = _write(tmp_path / "n.tensors", sd)
    d = TensorDeserializer(path, device="cuda:0")
    for k, v in sd.items():
        assert torch.equal(d[k].cpu(), v), k
    node = _sysfs_node(0)
    for s in _stats(d):
        assert s["numa_node"] == node, (s, node)
        if node is not None and _online_nodes() > 1:
            assert s["reader_cpus"] > 0, s
        else:
            assert s["reader_cpus"] == 0, s


CHILD = r"""
import hashlib, json, sys, torch
from tensorizer_rs import TensorDeserializer
path, dev = sys.argv[1], int(sys.argv[2])
d = TensorDeserializer(path, device=f"cuda:{dev}")
raw = lambda t: t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
sha = {k: hashlib.sha256(raw(v)).hexdigest() for k, v in d.items()}
print(json.dumps({"stats": d.cuda_load_stats["loads"], "sha256": sha}))
"""


def test_local_ranks_each_load_their_shard_exactly(tmp_path):
    """Two ranks of one host (``LOCAL_WORLD_SIZE=2``), each its own shard to its own GPU (or
    both to cuda:0 on a one-GPU machine) at once; each gets half the default readers and
    staging, and exactly its bytes."""
    ranks = 2
    gpus = torch.cuda.device_count()
    shards = [_state(10 + r) for r in range(ranks)]
    paths = [_write(tmp_path / f"model-rank-{r:03d}.tensors", s) for r, s in enumerate(shards)]
    procs = []
    for r, p in enumerate(paths):
        env = {**os.environ, "LOCAL_WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r)}
        env.pop("TENSORIZER_RS_LOCAL_RANKS", None)
        env.pop("TENSORIZER_RS_STAGING_BYTES", None)
        cmd = [sys.executable, "-c", CHILD, p, str(r % gpus)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for r, proc in enumerate(procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
        got = json.loads(out.strip().splitlines()[-1])
        for k, v in shards[r].items():
            assert got["sha256"][k] == _sha(v), (r, k)
        for s in got["stats"]:
            assert s["local_ranks"] == ranks and s["staging_buffers"] == 16, s
