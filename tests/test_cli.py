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


def test_verify_encrypted_without_key_names_the_flags(vector_manifests):
    out = run("verify", vector_manifests["enc_random_v3.tensors"]["path"])
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "--keyfile" in out.stderr and "--passphrase-env" in out.stderr
    assert "DecryptionParams" not in out.stderr


def test_verify_with_keyfile_and_passphrase_env(vector_manifests):
    raw = vector_manifests["enc_random_v3.tensors"]
    key = os.path.join(os.path.dirname(raw["path"]), raw["encryption"]["key_file"])
    assert run("verify", raw["path"], "--keyfile", key).returncode == 0
    pw = vector_manifests["tz2101_enc_passphrase.tensors"]
    env = {**os.environ, "TZ_TEST_PASSPHRASE": pw["encryption"]["passphrase"]}
    ok = subprocess.run(
        [sys.executable, "-m", "tensorizer_rs", "verify", pw["path"]]
        + ["--passphrase-env", "TZ_TEST_PASSPHRASE"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr


def test_unset_passphrase_env_is_one_line(vector_manifests, monkeypatch):
    monkeypatch.delenv("TZ_UNSET_VARIABLE", raising=False)
    out = run(
        "verify",
        vector_manifests["tz2101_enc_passphrase.tensors"]["path"],
        "--passphrase-env",
        "TZ_UNSET_VARIABLE",
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1
    assert "--passphrase-env TZ_UNSET_VARIABLE" in out.stderr and "not set" in out.stderr


def test_closed_pipe_exits_quietly(tmp_path):
    # Enough lines that `inspect` is still writing when the reader has gone (a pipe holds 64 KiB).
    f = tmp_path / "many.tensors"
    with TensorSerializer(str(f)) as s:
        s.write_state_dict({f"tensor_{i:05d}": torch.zeros(2) for i in range(4000)})
    p = subprocess.Popen(
        [sys.executable, "-m", "tensorizer_rs", "inspect", str(f)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().startswith(str(f))  # like `| head -1`
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 0
    assert err == "", err
