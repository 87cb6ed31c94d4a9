"""Bad files give a clear exception naming the file, the tensor where known, and the problem:
never a panic, a hang, a huge allocation or a partial result."""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
import threading

import pytest
import torch
from tensorizer_rs import (
    HashMismatchError,
    InvalidVersionError,
    NotATensorizerFileError,
    TensorDeserializer,
    TensorizerError,
    TensorizerFormatError,
    TensorSerializer,
)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.tensors"
    with TensorSerializer(str(path)) as s:
        s.write_state_dict(
            {"alpha": torch.arange(10, dtype=torch.float32), "beta": torch.ones(3, 3)}
        )
    return path


def _mutate(src, dst, fn):
    data = bytearray(src.read_bytes())
    fn(data)
    dst.write_bytes(bytes(data))
    return dst


def _open(path, **kw):
    return TensorDeserializer(str(path), device="cpu", **kw)


def test_wrong_magic(good, tmp_path):
    bad = _mutate(good, tmp_path / "magic.tensors", lambda d: d.__setitem__(slice(0, 5), b"NOPE!"))
    with pytest.raises(NotATensorizerFileError, match="Not a tensorizer file") as e:
        _open(bad)
    assert "magic.tensors" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_unknown_version_and_flags(good, tmp_path):
    bad = _mutate(
        good, tmp_path / "v9.tensors", lambda d: d.__setitem__(slice(5, 9), struct.pack("<I", 9))
    )
    with pytest.raises(InvalidVersionError, match="version 9"):
        _open(bad)
    flags = _mutate(good, tmp_path / "flags.tensors", lambda d: d.__setitem__(9, 8))
    with pytest.raises(InvalidVersionError, match="feature flags"):
        _open(flags)


@pytest.mark.parametrize("cut", [0, 4, 40, 73, 100, 262217, -9])
def test_truncated_files(good, tmp_path, cut):
    data = good.read_bytes()
    bad = tmp_path / "cut.tensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(TensorizerError) as e:
        _open(bad)
    assert "cut.tensors" in str(e.value)


def test_absurd_lengths_do_not_allocate(good, tmp_path):
    # index length of 2^62 and a tensor count of 2^40: rejected before any allocation.
    big_index = _mutate(
        good,
        tmp_path / "idx.tensors",
        lambda d: d.__setitem__(slice(65, 73), struct.pack("<Q", 1 << 62)),
    )
    with pytest.raises(TensorizerFormatError, match="runs past the end"):
        _open(big_index)
    many = _mutate(
        good,
        tmp_path / "count.tensors",
        lambda d: d.__setitem__(slice(57, 65), struct.pack("<Q", 1 << 40)),
    )
    with pytest.raises(TensorizerFormatError):
        _open(many)


def test_data_length_past_end(good, tmp_path):
    # Grow beta's shape in the index so its data would run past the end of the file.
    data = bytearray(good.read_bytes())
    at = data.find(b"beta") + 4 + 1 + 1 + 3 + 1  # name, type, dtype len, "<f4", ndim
    data[at : at + 4] = struct.pack("<I", 1 << 30)
    bad = tmp_path / "long.tensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(TensorizerFormatError) as e:
        _open(bad)
    assert "beta" in str(e.value) and "long.tensors" in str(e.value)


def test_hash_mismatch_names_tensor(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[-9] ^= 0xFF  # last data byte of "beta" (before the 8-byte terminator)
    bad = tmp_path / "flip.tensors"
    bad.write_bytes(bytes(data))
    _open(bad)  # no verification: loads
    with pytest.raises(HashMismatchError, match="beta") as e:
        _open(bad, verify_hash=True)
    assert "flip.tensors" in str(e.value)


def test_invalid_names(tmp_path):
    with (
        pytest.raises(ValueError, match="empty tensor path"),
        TensorSerializer(str(tmp_path / "empty.tensors")) as s,
    ):
        s.write_state_dict({"": torch.ones(1)})
    assert not (tmp_path / "empty.tensors").exists()
    with pytest.raises(TypeError):
        TensorSerializer(str(tmp_path / "k.tensors")).write_state_dict({1: torch.ones(1)})


def test_header_disagreeing_with_index(good, tmp_path):
    data = bytearray(good.read_bytes())
    second = data.rfind(b"alpha")  # the record header's copy of the name
    data[second : second + 5] = b"gamma"
    bad = tmp_path / "hdr.tensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(TensorizerFormatError, match="disagrees with the metadata index") as e:
        _open(bad)
    assert "alpha" in str(e.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        _open(tmp_path / "nope.tensors")


def test_failed_write_leaves_nothing(tmp_path):
    dest = tmp_path / "out.tensors"
    with pytest.raises(TypeError), TensorSerializer(str(dest)) as s:
        s.write_state_dict({"ok": torch.ones(4), "bad": "not a tensor"})
    assert list(tmp_path.iterdir()) == []
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_pipe_is_refused_at_once_not_waited_on(tmp_path):
    """A FIFO with no writer (or /dev/stdin fed by a pipe): refused by name (was: the open
    blocked for ever, deaf to Ctrl-C; /dev/stdin read as "bad magic bytes"). Run in a child
    so that a regression fails the test instead of hanging the suite."""
    fifo = tmp_path / "fifo.tensors"
    os.mkfifo(fifo)
    code = (
        "import sys\n"
        "from tensorizer_rs import TensorDeserializer, TensorizerValueError\n"
        "try:\n"
        "    TensorDeserializer(sys.argv[1], device='cpu')\n"
        "except TensorizerValueError as e:\n"
        "    print(e)\n"
    )
    for path, stdin in [(str(fifo), subprocess.DEVNULL), ("/dev/stdin", subprocess.PIPE)]:
        proc = subprocess.run(
            [sys.executable, "-c", code, path],
            input=b"" if stdin == subprocess.PIPE else None,
            stdin=None if stdin == subprocess.PIPE else stdin,
            capture_output=True,
            timeout=60,
            check=False,
        )
        out = proc.stdout.decode()
        assert path in out and "not a regular file" in out, (out, proc.stderr.decode()[-2000:])


def test_writes_go_through_links_keep_the_mode_and_leave_devices_devices(tmp_path):
    """A rewrite keeps the old file's mode (was: 0600 became 0644) and writes through a symbolic
    link to its target (was: the link was replaced by a file); a link to /dev/null takes the
    bytes and /dev/null stays a device (was: as root, /dev/null became a regular file)."""
    sd = {"a": torch.arange(6.0)}
    real = tmp_path / "real.tensors"
    real.write_bytes(b"old")
    real.chmod(0o600)
    link = tmp_path / "link.tensors"
    link.symlink_to("real.tensors")
    with TensorSerializer(str(link)) as s:
        s.write_state_dict(sd)
    assert link.is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o600
    assert torch.equal(TensorDeserializer(str(link), device="cpu")["a"], sd["a"])
    null = tmp_path / "null.tensors"
    null.symlink_to("/dev/null")
    with TensorSerializer(str(null)) as s:
        s.write_state_dict(sd)
    assert null.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "link.tensors",
        "null.tensors",
        "real.tensors",
    ]
    fifo = tmp_path / "fifo.tensors"
    os.mkfifo(fifo)
    with pytest.raises(TensorizerError, match="pipe"):
        TensorSerializer(str(fifo))


def test_close_while_another_thread_loads(good):
    """close() from one thread while another reads lazily: the close succeeds and the reader
    gets a clear error or its tensor (was: PyO3's bare "RuntimeError: Already borrowed" from
    close, in 95 % of tries, and the file left open)."""
    problems = []
    for _ in range(300):
        d = _open(good, lazy_load=True)
        go = threading.Event()

        def reader(d=d, go=go):
            go.wait()
            try:
                for _ in range(50):
                    d["alpha"], d["beta"]
            except TensorizerError as e:
                if "closed" not in str(e):
                    problems.append(repr(e))
            except Exception as e:  # noqa: BLE001 - any other type is the failure
                problems.append(repr(e))

        t = threading.Thread(target=reader)
        t.start()
        go.set()
        try:
            d.close()
        except Exception as e:  # noqa: BLE001
            problems.append(f"close: {e!r}")
        t.join()
    assert not problems, problems[:5]
