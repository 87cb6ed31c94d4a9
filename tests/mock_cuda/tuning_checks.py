"""What a GPU load chooses from where its file lives and who shares the host, checked against
the stand-in driver (tests/mock_cuda/libcuda.c) in a subprocess whose environment the test
sets (tests/test_cuda_mock.py): the file system (tmpfs against a disk's), the local ranks
(``LOCAL_WORLD_SIZE``, ``TENSORIZER_RS_LOCAL_RANKS``) and the NUMA node of the GPU (a fake
sysfs tree in ``TENSORIZER_RS_SYSFS``). Usage: ``tuning_checks.py CHECK DIR``; prints one JSON
line of what the loads reported, after checking every byte.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tensorizer_rs import TensorDeserializer, TensorSerializer, _cuda


def state(n=26, seed=0):
    """``n`` tensors of 2.4 MB each: more pieces than any default has readers."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"w{k:02d}": torch.randn(600_000, generator=g) for k in range(n)}
    sd["norm"] = torch.randn(1000, generator=g).to(torch.bfloat16)
    sd["odd"] = torch.randn(333_333, generator=g)
    return sd


def write(path: Path, sd) -> str:
    s = TensorSerializer(str(path))
    s.write_state_dict(sd)
    s.close()
    return str(path)


def gpu_load(path, **kw):
    """New tensors through the GPU pipeline (device "cpu": the stand-in's memory is the
    host's), and the native load's stats."""
    d = TensorDeserializer(path, device="cpu", lazy_load=True, **kw)
    loaded = _cuda.load(d._cuda_request(), list(d._selected), False)
    d._take(loaded)
    return {d._entries[i]["name"]: d._cache[i] for i in d._selected}, loaded.stats


def gpu_fill(path, sd):
    """In place into a module holding tensors of the right shapes; the stats."""
    m = torch.nn.Module()
    for k, v in sd.items():
        m.register_buffer(k, torch.zeros_like(v))
    ptrs = {k: v.data_ptr() for k, v in m.state_dict().items()}
    d = TensorDeserializer(path, device="cpu", lazy_load=True)
    targets = [(i, m, d._entries[i]["name"]) for i in d._selected]
    loaded = _cuda.load_into_module(d._cuda_request(), targets, [], False, cached=d._cache)
    assert loaded.in_place == set(d._selected), loaded.in_place
    for k, v in m.state_dict().items():
        assert v.data_ptr() == ptrs[k] and torch.equal(v, sd[k]), k
    return loaded.stats


def exact(out, sd):
    for k, v in sd.items():
        assert torch.equal(out[k], v), k


def one(stats):
    assert len(stats) == 1, stats
    return stats[0]


def main(check: str, where: Path) -> dict:
    sd = state()
    path = write(where / f"{check}.tensors", sd)
    if check == "load":  # new tensors and in place; what the defaults chose
        out, stats = gpu_load(path)
        exact(out, sd)
        return {"new": one(stats), "in_place": one(gpu_fill(path, sd))}
    if check == "readers":  # num_readers=3 given explicitly
        out, stats = gpu_load(path, num_readers=3)
        exact(out, sd)
        return {"new": one(stats)}
    raise SystemExit(f"unknown check {check}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
