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
