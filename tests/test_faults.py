"""Stalled servers, changing objects, killed writers and Ctrl-C (issue 24), against real
servers on 127.0.0.1 (tests/servers/http_server.py's fault modes, moto's S3) and real signals
to child processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import http_server, interrupt_load
from tensorizer_rs import (
    EncryptionParams,
    TensorSerializer,
)


def _sigint_after_ready(code: str, settle: float = 0.5) -> tuple[str, str, float]:
    """Run `code` in a child that prints "ready" before the part to interrupt; SIGINT it
    `settle` seconds after that; return stdout, stderr and how long it took to end after."""
    prog = (
        "import signal\n"
        "import torch\n"  # imported before "ready": the signal must land in our code
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"{code}\n"
        "print('finished', flush=True)\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", prog], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "ready", p.communicate()
        time.sleep(settle)
        assert p.poll() is None, p.communicate()
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        return out, err, time.monotonic() - t0
    finally:
        p.kill()
        p.wait()


# ----------------------------------------------------------------------------- 3: Ctrl-C
def test_ctrl_c_while_the_server_never_answers(tmp_path):
    """The open's first request gets no answer (was: KeyboardInterrupt only after the request
    timed out and was retried, about 365 s)."""
    root = tmp_path / "www"
    root.mkdir()
    with TensorSerializer(str(root / "m.tensors")) as s:
        s.write_state_dict({"a": torch.ones(4)})
    with http_server(root) as base:
        url = f"{base}/silent/m.tensors"
        load = f"from tensorizer_rs import TensorDeserializer as D; D({url!r}, device='cpu')"
        out, err, took = interrupt_load(base, "/silent/m.tensors", load, min_requests=1)
    assert "KeyboardInterrupt" in err, err
    assert "loaded" not in out
    assert took < 2, f"the open went on for {took:.1f} s after Ctrl-C"


@pytest.fixture(scope="module")
def slow_kdf_file(tmp_path_factory):
    """A passphrase file whose stored KDF asks for 16 passes over 256 MiB: within the default
    bound, several seconds of Argon2."""
    from test_hostile_files import FAST, kdf_patched

    d = tmp_path_factory.mktemp("slowkdf")
    enc = EncryptionParams.from_string("hunter2", **FAST)
    with TensorSerializer(str(d / "pw.tensors"), encryption=enc) as s:
        s.write_state_dict({"a": torch.arange(6.0), "b": torch.ones(3)})
    return kdf_patched((d / "pw.tensors", enc.salt), d / "slow.tensors", 16, 256 << 20)


@pytest.mark.parametrize("lazy", [False, True])
def test_ctrl_c_during_key_derivation_of_a_load(slow_kdf_file, lazy):
    code = (
        "from tensorizer_rs import DecryptionParams, TensorDeserializer as D\n"
        "dec = DecryptionParams.from_string('hunter2')\n"
        "print('ready', flush=True)\n"
        f"d = D({str(slow_kdf_file)!r}, device='cpu', lazy_load={lazy}, encryption=dec)\n"
        "d['a']"
    )
    out, err, took = _sigint_after_ready(code)
    assert "KeyboardInterrupt" in err, err
    assert "finished" not in out
    assert took < 1.5, f"the load went on for {took:.1f} s after Ctrl-C"


def test_ctrl_c_during_key_derivation_for_writing():
    code = (
        "from tensorizer_rs import EncryptionParams\n"
        "print('ready', flush=True)\n"
        "EncryptionParams.from_string('hunter2', opslimit=16, memlimit=256 << 20)"
    )
    out, err, took = _sigint_after_ready(code)
    assert "KeyboardInterrupt" in err, err
    assert "finished" not in out
    assert took < 1.5, f"the derivation went on for {took:.1f} s after Ctrl-C"
