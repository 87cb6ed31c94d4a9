"""The GPU pipeline without a GPU: a stand-in libcuda (tests/mock_cuda/libcuda.c) with real
asynchronous streams runs every check in tests/mock_cuda/checks.py in a subprocess. Also the
no-CUDA path: a clear TensorizerUnsupportedError, never a panic."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorizer_rs import TensorDeserializer, TensorizerUnsupportedError, _native

HERE = Path(__file__).resolve().parent / "mock_cuda"


@pytest.fixture(scope="module")
def mock_libcuda(tmp_path_factory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in libcuda")
    out = tmp_path_factory.mktemp("mockcuda")
    subprocess.run(
        [
            cc,
            "-shared",
            "-fPIC",
            "-O1",
            "-pthread",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            str(out / "libcuda.so"),
            str(HERE / "libcuda.c"),
        ],
        check=True,
    )
    return out


def _run(mock_dir: Path, vectors_dir: Path, tmp_path: Path, extra_env=None, args=()):
    import tensorizer_rs

    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(mock_dir), env.get("LD_LIBRARY_PATH")])
    )
    env["TENSORIZER_VECTORS"] = str(vectors_dir)
    env["MOCK_TMP"] = str(tmp_path)
    env["MOCK_CUDA_DELAY_US"] = "100"
    # Compiled decryption kernels are kept here, not in the user's cache.
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    # The subprocess must import the same build as this process.
    pkg_parent = str(Path(tensorizer_rs.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, str(HERE / "checks.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.skipif(_native.cuda_available()[0], reason="a real CUDA driver is loaded here")
def test_pipeline_against_stand_in_driver(mock_libcuda, vectors_dir, tmp_path):
    proc = _run(mock_libcuda, vectors_dir, tmp_path)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-12000:]
    assert report.count("PASS ") >= 15, report


@pytest.mark.skipif(_native.cuda_available()[0], reason="a real CUDA driver is loaded here")
def test_without_batched_copies(mock_libcuda, vectors_dir, tmp_path):
    """Drivers older than CUDA 12.8 have no cuMemcpyBatchAsync: copies go one by one."""
    checks = [
        "vectors_exact_bytes",
        "many_small_tensors_share_allocations",
        "larger_than_pool_all_modes",
    ]
    proc = _run(mock_libcuda, vectors_dir, tmp_path, {"MOCK_CUDA_NO_BATCH": "1"}, args=checks)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0 and report.count("PASS ") == 3, report[-12000:]


@pytest.mark.skipif(_native.cuda_available()[0], reason="a real CUDA driver is loaded here")
def test_driver_init_failure_is_unsupported(mock_libcuda, vectors_dir, tmp_path):
    proc = _run(mock_libcuda, vectors_dir, tmp_path, {"MOCK_CUDA_INIT_ERROR": "1"})
    assert proc.returncode == 0 and "PASS init_error" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(_native.cuda_available()[0], reason="CUDA is available here")
def test_no_cuda_is_a_clear_error(tmp_path):
    import torch
    from tensorizer_rs import TensorSerializer

    ok, why = _native.cuda_available()
    assert not ok and "CUDA is not available" in why
    path = str(tmp_path / "a.tensors")
    s = TensorSerializer(path)
    s.write_state_dict({"a": torch.ones(3)})
    s.close()
    with pytest.raises(TensorizerUnsupportedError, match="CUDA"):
        _native.cuda_load(_native.TensorFile(path), [], 0, 0)
    with pytest.raises(TensorizerUnsupportedError, match="CUDA"):
        _native.cuda_release_staging(0)
    if not torch.cuda.is_available():
        with pytest.raises(TensorizerUnsupportedError, match="cuda"):
            TensorDeserializer(path, device="cuda")
        with pytest.raises(TensorizerUnsupportedError):
            TensorDeserializer(path, device="cuda:0", lazy_load=True)
    # The package keeps working on the CPU.
    assert TensorDeserializer(path, device="cpu")["a"].sum() == 3


@pytest.mark.skipif(_native.cuda_available()[0], reason="a real CUDA driver is loaded here")
def test_gpu_decryption_against_stand_in_driver(mock_libcuda, vectors_dir, tmp_path):
    """The decryption kernels compiled with NVRTC, launched through the stand-in driver, whose
    launches open the chunks with libsodium (tests/mock_cuda/decrypt_checks.py)."""
    import ctypes.util

    if not ctypes.util.find_library("sodium"):
        pytest.fail("libsodium is needed (scripts/setup-env.sh installs libsodium23)")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(mock_libcuda), env.get("LD_LIBRARY_PATH")])
    )
    env["TENSORIZER_VECTORS"] = str(vectors_dir)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    import tensorizer_rs

    pkg_parent = str(Path(tensorizer_rs.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "decrypt_checks.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0 and report.count("PASS ") == 6, report[-12000:]


def _tmpfs_dir() -> Path | None:
    """A writable tmpfs mount (``/dev/shm`` first), or None."""
    mounts = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "tmpfs":
                mounts.append(Path(parts[1].replace("\\040", " ")))
    mounts.sort(key=lambda p: p != Path("/dev/shm"))
    return next((m for m in mounts if os.access(m, os.W_OK | os.X_OK)), None)


def _tuning(mock_dir: Path, check: str, where: Path, env=None) -> dict:
    """Run tests/mock_cuda/tuning_checks.py CHECK in a fresh process (the environment is read
    once per process) and return what its loads reported."""
    import json

    import tensorizer_rs

    full = dict(os.environ)
    for k in ("LOCAL_WORLD_SIZE", "TENSORIZER_RS_LOCAL_RANKS", "TENSORIZER_RS_STAGING_BYTES"):
        full.pop(k, None)
    full["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(mock_dir), full.get("LD_LIBRARY_PATH")])
    )
    full["MOCK_CUDA_DELAY_US"] = "100"
    pkg_parent = str(Path(tensorizer_rs.__file__).resolve().parents[1])
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, full.get("PYTHONPATH")]))
    full.update(env or {})
    proc = subprocess.run(
        [sys.executable, str(HERE / "tuning_checks.py"), check, str(where)],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_native.cuda_available()[0], reason="a real CUDA driver is loaded here")
def test_tmpfs_files_take_the_memory_path(mock_libcuda, tmp_path):
    """A file on tmpfs (told by the storage layer from the open file, not its path) is read
    with buffered reads and the memory-backed reader count, new tensors and in place, every
    byte exact; a file on the disk's file system keeps the page-cache path's choice."""
    import tempfile

    shm = _tmpfs_dir()
    if shm is None:
        pytest.skip("no writable tmpfs on this host")
    with tempfile.TemporaryDirectory(dir=shm, prefix="tz-tmpfs-") as d:
        mem = _tuning(mock_libcuda, "load", Path(d))
        direct = _tuning(mock_libcuda, "load", Path(d), {"TENSORIZER_RS_IO": "direct"})
    disk = _tuning(mock_libcuda, "load", tmp_path)
    assert disk["new"]["fs"] != "tmpfs", disk  # pytest's tmp_path is on the disk here
    for how in ("new", "in_place"):
        s = mem[how]
        assert (s["fs"], s["read_mode"], s["direct_read_bytes"]) == ("tmpfs", "buffered", 0), s
        assert s["buffered_read_bytes"] >= 26 * 2_400_000, s
        d = disk[how]
        assert d["fs"] in ("ext4", "xfs", "btrfs", "overlay", "nfs", "other"), d
        assert d["read_mode"] == "auto" and d["load_buffers"] == 2 * d["readers"], d
        # Only the read mode differs: readers and buffers as measured for the page cache.
        assert (s["readers"], s["load_buffers"]) == (d["readers"], d["load_buffers"]), (s, d)
    # Asked for explicitly, the read mode is the caller's.
    assert direct["new"]["read_mode"] == "direct" and direct["new"]["fs"] == "tmpfs", direct


@pytest.mark.skipif(_native.cuda_available()[0], reason="a real CUDA driver is loaded here")
def test_local_ranks_share_readers_and_staging(mock_libcuda, tmp_path):
    """N ranks of one job on a host (vLLM's LOCAL_WORLD_SIZE) each take 1/N of the default
    readers (at least 2) and of the staging pool (at least 32 MiB), so together they use what
    one process does; TENSORIZER_RS_LOCAL_RANKS, num_readers= and TENSORIZER_RS_STAGING_BYTES
    win."""
    got = {}
    for n in (1, 2, 8):
        got[n] = _tuning(mock_libcuda, "load", tmp_path, {"LOCAL_WORLD_SIZE": str(n)})["new"]
    assert [got[n]["local_ranks"] for n in (1, 2, 8)] == [1, 2, 8], got
    assert [got[n]["staging_buffers"] for n in (1, 2, 8)] == [32, 16, 4], got
    one = got[1]["readers"]
    for n in (2, 8):
        assert got[n]["readers"] == max(2, one // n), (n, got[n], one)
        assert got[n]["load_buffers"] == 2 * got[n]["readers"], got[n]
    over = _tuning(
        mock_libcuda,
        "load",
        tmp_path,
        {"LOCAL_WORLD_SIZE": "8", "TENSORIZER_RS_LOCAL_RANKS": "2"},
    )["new"]
    assert (over["local_ranks"], over["staging_buffers"]) == (2, 16), over
    assert over["readers"] == got[2]["readers"], over
    mine = _tuning(mock_libcuda, "readers", tmp_path, {"LOCAL_WORLD_SIZE": "8"})["new"]
    assert mine["readers"] == 3 and mine["local_ranks"] == 8, mine
    pool = _tuning(
        mock_libcuda,
        "load",
        tmp_path,
        {"LOCAL_WORLD_SIZE": "8", "TENSORIZER_RS_STAGING_BYTES": str(64 << 20)},
    )["new"]
    assert pool["staging_buffers"] == 8, pool


def _fake_sysfs(root: Path, online: str, node1: str) -> Path:
    """Two nodes; the stand-in's device 0 (PCI 0000:1B:00.0) on node 1."""
    files = {
        "devices/system/node/online": online,
        "devices/system/node/node0/cpulist": "4000-4001",
        "devices/system/node/node1/cpulist": node1,
        "bus/pci/devices/0000:1b:00.0/numa_node": "1",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")
    return root


@pytest.mark.skipif(_native.cuda_available()[0], reason="a real CUDA driver is loaded here")
def test_readers_run_on_the_gpus_numa_node(mock_libcuda, tmp_path):
    """The GPU's PCI bus id (cuDeviceGetPCIBusId) finds its NUMA node in sysfs; with more than
    one node the readers are pinned to that node's CPUs (those this process may use), every
    byte still exact; one node, or TENSORIZER_RS_NUMA=0, pins nothing."""
    allowed = sorted(os.sched_getaffinity(0))
    cpulist = ",".join(map(str, allowed))
    sysfs = str(_fake_sysfs(tmp_path / "sys", "0-1", cpulist))
    env = {"TENSORIZER_RS_SYSFS": sysfs}
    s = _tuning(mock_libcuda, "load", tmp_path, env)
    for how in ("new", "in_place"):
        assert (s[how]["numa_node"], s[how]["reader_cpus"]) == (1, len(allowed)), s
    # One CPU of the node: every reader on it.
    _fake_sysfs(tmp_path / "sys1", "0-1", str(allowed[-1]))
    one = _tuning(mock_libcuda, "load", tmp_path, {"TENSORIZER_RS_SYSFS": str(tmp_path / "sys1")})
    assert (one["new"]["numa_node"], one["new"]["reader_cpus"]) == (1, 1), one
    off = _tuning(mock_libcuda, "load", tmp_path, {**env, "TENSORIZER_RS_NUMA": "0"})
    assert (off["new"]["numa_node"], off["new"]["reader_cpus"]) == (None, 0), off
    single = _fake_sysfs(tmp_path / "sys2", "0", cpulist)
    s = _tuning(mock_libcuda, "load", tmp_path, {"TENSORIZER_RS_SYSFS": str(single)})
    assert (s["new"]["numa_node"], s["new"]["reader_cpus"]) == (1, 0), s
