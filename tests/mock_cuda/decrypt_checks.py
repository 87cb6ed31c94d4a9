"""The GPU decryption path against the stand-in libcuda (run by tests/test_cuda_mock.py in a
subprocess with the stand-in first on LD_LIBRARY_PATH). The kernels are really compiled with
NVRTC and the module image handed to the driver; the stand-in's kernel launches open the chunks
with libsodium, reading the kernel argument with its own copy of the layout, so argument
packing, launch splitting and verdict plumbing are tested for real. Device memory is host
memory here. Prints ``PASS name`` per check."""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import decrypt_cases as dc
from tensorizer_rs import _native


class HostMemory:
    """'Device' buffers: host memory the stand-in's kernels work on."""

    def __init__(self):
        self.keep = []

    def put(self, data: bytes, shift: int) -> int:
        buf = ctypes.create_string_buffer(len(data) + 32)
        addr = ctypes.addressof(buf)
        addr += (16 - addr % 16) % 16 + shift
        ctypes.memmove(addr, data, len(data))
        self.keep.append(buf)
        return addr

    def get(self, addr: int, n: int) -> bytes:
        return ctypes.string_at(addr, n)


def launches() -> tuple[int, int]:
    lib = ctypes.CDLL("libcuda.so.1")
    v, d = ctypes.c_ulong(), ctypes.c_ulong()
    lib.mock_cuda_launches(ctypes.byref(v), ctypes.byref(d))
    return v.value, d.value


def main() -> None:
    _native.cuda_nvrtc_search_dirs(dc.nvrtc_dirs())
    print("kernels:", _native.cuda_decrypt_kernels(0))
    mem = HostMemory()

    def open_(key, chunks):
        return _native.cuda_open_chunks(0, key, chunks)

    before = launches()
    dc.lengths_and_alignments(mem, open_)
    print("PASS lengths_and_alignments")
    dc.tampering_and_wrong_keys(mem, open_)
    print("PASS tampering_and_wrong_keys")
    mid = launches()
    c0 = _native.cuda_counters()["decrypted_on_device"]
    opened = dc.many_chunks(mem, open_, 75)
    assert _native.cuda_counters()["decrypted_on_device"] - c0 == opened
    after = launches()
    # 75 chunks: three launches of each kernel.
    assert (after[0] - mid[0], after[1] - mid[1]) == (3, 3), (mid, after)
    assert after[0] > before[0]
    print("PASS many_chunks")
    n = dc.golden_vectors(mem, open_, Path(os.environ["TENSORIZER_VECTORS"]))
    assert n >= 20, n
    print(f"PASS golden_vectors ({n} tensors)")
    with tempfile.TemporaryDirectory() as d:
        dc.written_file(mem, open_, os.path.join(d, "w.tensors"))
    print("PASS written_file")
    # Bad arguments are errors, not crashes.
    from tensorizer_rs import TensorizerValueError

    try:
        open_(b"short", [])
        raise AssertionError("a short key was accepted")
    except TensorizerValueError as e:
        assert "32 bytes" in str(e), e
    print("PASS bad_arguments")


if __name__ == "__main__":
    main()
