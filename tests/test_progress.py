"""Progress where work is long: the writer's `progress` callback, and the tqdm bar of the CLI's
verify, shown on a terminal only."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import torch
from tensorizer_rs import TensorSerializer


def test_serializer_progress_counts_every_byte(tmp_path, monkeypatch):
    from tensorizer_rs import serialization

    monkeypatch.setattr(serialization, "_PROGRESS_GROUP_BYTES", 1000)  # several calls
    seen = []
    tensors = {f"t{i}": torch.ones(100 + i) for i in range(10)}
    with TensorSerializer(str(tmp_path / "p.tensors"), progress=seen.append) as s:
        s.write_state_dict(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(seen) > 1 and seen == sorted(seen) and seen[-1] == total


def _run_on_terminal(args: list) -> tuple[int, str]:
    """Run `args` with stderr (and stdout) on a pseudo-terminal; returns (status, output)."""
    leader, follower = pty.openpty()
    # 24 rows, 100 columns: a new pseudo-terminal is 0 wide, where tqdm draws nothing.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    p = subprocess.Popen(args, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO once the child has exited and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    return p.wait(timeout=60), out.decode(errors="replace")


def test_cli_verify_shows_a_bar_on_a_terminal_only(tmp_path):
    f = tmp_path / "v.tensors"
    with TensorSerializer(str(f)) as s:
        s.write_state_dict({"a": torch.ones(1 << 20)})
    cmd = [sys.executable, "-m", "tensorizer_rs", "verify", str(f)]
    rc, out = _run_on_terminal(cmd)
    assert rc == 0 and "verify:" in out and "/4.19M" in out, out
    piped = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "verify:" not in piped.stderr + piped.stdout
