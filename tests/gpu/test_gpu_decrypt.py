"""The GPU decryption kernels on a real GPU, through ``_native.cuda_open_chunks`` (the API the
load pipeline will call; skipped without CUDA): every encrypted golden vector, our writer's
multi-chunk tensors, tampering, wrong keys, many chunks, and the kernels' throughput.

Run on the GPU machine (see docs/gpu.md): ``pytest -m gpu -s tests/gpu/test_gpu_decrypt.py``.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import decrypt_cases as dc
import pytest
import torch
from tensorizer_rs import _native

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def kernels():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.cuda.init()
    # torch's own CUDA wheels hold libnvrtc; the Rust side also finds them from the libraries
    # torch has loaded, these are belt and braces.
    torch_lib = Path(torch.__file__).parent / "lib"
    _native.cuda_nvrtc_search_dirs(dc.nvrtc_dirs() + [str(torch_lib)])
    t = time.perf_counter()
    desc = _native.cuda_decrypt_kernels(torch.cuda.current_device())
    print(f"\nkernels: {desc} ({time.perf_counter() - t:.2f} s to compile and load)")
    return desc


class DeviceMemory:
    """Buffers in device memory from torch's allocator."""

    def __init__(self):
        self.keep = {}

    def put(self, data: bytes, shift: int) -> int:
        t = torch.empty(len(data) + 32, dtype=torch.uint8, device="cuda")
        addr = t.data_ptr() + shift  # torch's blocks are 512-byte aligned
        if data:
            src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            t[shift : shift + len(data)].copy_(src)
        torch.cuda.synchronize()
        self.keep[addr] = (t, shift)
        return addr

    def get(self, addr: int, n: int) -> bytes:
        base = max(a for a in self.keep if a <= addr)
        t, shift = self.keep[base]
        off = shift + (addr - base)
        return bytes(t[off : off + n].cpu().numpy().tobytes())


def _open(key, chunks):
    stream = torch.cuda.current_stream().cuda_stream
    return _native.cuda_open_chunks(torch.cuda.current_device(), key, chunks, stream)


def test_lengths_and_alignments(kernels):
    dc.lengths_and_alignments(DeviceMemory(), _open)


def test_tampering_and_wrong_keys(kernels):
    dc.tampering_and_wrong_keys(DeviceMemory(), _open)


def test_many_chunks(kernels):
    """Also: the bytes went through the kernels (the counter a pipeline test will check)."""
    before = _native.cuda_counters()["decrypted_on_device"]
    opened = dc.many_chunks(DeviceMemory(), _open, 200)
    assert _native.cuda_counters()["decrypted_on_device"] - before == opened


def test_golden_vectors(kernels, vectors_dir):
    assert dc.golden_vectors(DeviceMemory(), _open, Path(vectors_dir)) >= 20


def test_written_file(kernels, tmp_path):
    dc.written_file(DeviceMemory(), _open, str(tmp_path / "w.tensors"))


def test_two_threads_at_once(kernels):
    """Two threads, each on its own stream, open their own chunks concurrently."""
    import threading

    errors = []

    def work2(seed):
        try:
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                rng = random.Random(seed)
                key = rng.randbytes(32)
                items = []
                for n in (3 << 20, 999, 2 << 20):
                    nonce, plain = rng.randbytes(24), rng.randbytes(n)
                    ct, mac = _native.secretbox_seal(key, nonce, plain)
                    items.append((plain, ct, nonce, mac))
                mem = DeviceMemory()
                for _ in range(5):
                    addrs = [mem.put(ct, 0) for _, ct, _, _ in items]
                    v = _open(
                        key,
                        [(a, len(ct), nonce, mac) for a, (_, ct, nonce, mac) in zip(addrs, items)],
                    )
                    assert v == ["authentic"] * 3, v
                    assert all(mem.get(a, len(p)) == p for a, (p, *_r) in zip(addrs, items))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work2, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_kernel_throughput(kernels):
    """GB/s of the kernels alone: 1 GiB of 2 MiB chunks already in device memory, opened in
    pieces of 16 chunks (32 MiB) as the pipeline will launch them, on one stream; printed."""
    rng = random.Random(9)
    key, nonce = rng.randbytes(32), rng.randbytes(24)
    plain = rng.randbytes(dc.CHUNK)
    ct, mac = _native.secretbox_seal(key, nonce, plain)
    # Every chunk holds the same box (same nonce): each is verified and decrypted on its own.
    n = int(os.environ.get("GPU_DECRYPT_BENCH_CHUNKS", "512"))
    one = torch.frombuffer(bytearray(ct), dtype=torch.uint8).cuda()
    sealed = one.repeat(n)
    work = torch.empty_like(sealed)
    base = work.data_ptr()
    pieces = [
        [(base + i * dc.CHUNK, dc.CHUNK, nonce, mac) for i in range(p, min(p + 16, n))]
        for p in range(0, n, 16)
    ]
    best = float("inf")
    for _ in range(4):
        work.copy_(sealed)
        torch.cuda.synchronize()
        t = time.perf_counter()
        verdicts = [_open(key, chunks) for chunks in pieces]
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        assert all(v == ["authentic"] * len(c) for v, c in zip(verdicts, pieces))
    assert torch.equal(
        work[: dc.CHUNK].cpu(), torch.frombuffer(bytearray(plain), dtype=torch.uint8)
    )
    # One call for everything: launches of 32 chunks, one verdict read at the end.
    work.copy_(sealed)
    torch.cuda.synchronize()
    t = time.perf_counter()
    v = _open(key, [c for p in pieces for c in p])
    whole = time.perf_counter() - t
    assert v == ["authentic"] * n
    gb = n * dc.CHUNK / 1e9
    print(
        f"\nGPU decrypt ({torch.cuda.get_device_name()}): {gb / best:.1f} GB/s in 16-chunk pieces "
        f"(each call waits for its verdicts), {gb / whole:.1f} GB/s in one call, {n} x 2 MiB"
    )
