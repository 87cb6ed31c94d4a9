"""The tensorizer-rs command: inspect, verify, keygen."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import torch
from tensorizer_rs import TensorSerializer


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "tensorizer_rs", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_inspect_plain_and_json(tmp_path, vector_manifests):
    v = vector_manifests["dtypes.tensors"]
    out = run("inspect", v["path"])
    assert out.returncode == 0, out.stderr
    assert (
        "data version 2" in out.stdout
        and "t_bfloat16" in out.stdout
        and "encrypted: no" in out.stdout
    )
    info = json.loads(run("inspect", "--json", v["path"]).stdout)
    assert info["tensor_count"] == v["tensor_count"]
    assert [t["dtype"] for t in info["tensors"]] == [t["dtype"] for t in v["tensors"]]
    assert [t["shape"] for t in info["tensors"]] == [t["shape"] for t in v["tensors"]]


def test_inspect_shows_encryption(vector_manifests):
    info = json.loads(
        run("inspect", "--json", vector_manifests["enc_passphrase_v4.tensors"]["path"]).stdout
    )
    assert info["encrypted"] and info["encryption"]["key"].startswith("passphrase")
    assert info["encryption"]["opslimit"] == 3 and info["encryption"]["memlimit"] == 256 << 20
    raw = json.loads(
        run("inspect", "--json", vector_manifests["enc_random_v3.tensors"]["path"]).stdout
    )
    assert raw["encryption"]["key"] == "raw key"


def test_verify_ok_and_mismatch(tmp_path, vector_manifests):
    good = tmp_path / "g.tensors"
    with TensorSerializer(str(good)) as s:
        s.write_state_dict({"a": torch.ones(8)})
    ok = run("verify", good)
    assert ok.returncode == 0 and "OK: 1 tensors" in ok.stdout
    bad = run("verify", vector_manifests["corrupt_data.tensors"]["path"])
    assert bad.returncode != 0
    assert "tensor 'weight'" in bad.stderr and "mismatch" in bad.stderr


def test_keygen_writes_private_key(tmp_path):
    key = tmp_path / "k.key"
    assert run("keygen", key).returncode == 0
    assert len(key.read_bytes()) == 32
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert run("keygen", key).returncode != 0  # never overwrites
