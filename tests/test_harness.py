"""Self-test of the harness in conftest.py: CoreWeave's tensorizer runs in a subprocess only."""

import json
import sys

import pytest
from conftest import COREWEAVE_VERSIONS, run_coreweave

READ_VECTOR = r"""
import hashlib, json, sys
import tensorizer
from tensorizer import TensorDeserializer
out = {"version": tensorizer.__version__, "file": tensorizer.__file__, "tensors": {}}
with TensorDeserializer(sys.argv[1], device="cpu", verify_hash=True) as d:
    for name, t in d.items():
        raw = t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
        out["tensors"][name] = {"dtype": str(t.dtype).removeprefix("torch."),
                                "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest()}
print(json.dumps(out))
"""


def test_coreweave_not_in_test_process():
    assert "tensorizer" not in sys.modules
    with pytest.raises(ImportError):
        __import__("tensorizer")


@pytest.mark.crosscheck
@pytest.mark.parametrize("version", COREWEAVE_VERSIONS)
def test_run_coreweave_reads_v1_basic(version, vector_manifests, tmp_path):
    manifest = vector_manifests["v1_basic.tensors"]
    proc = run_coreweave(version, READ_VECTOR, manifest["path"], cwd=tmp_path)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"] == version
    assert f"tz-{version}" in got["file"]
    want = {
        t["name"]: {"dtype": t["dtype"], "shape": t["shape"], "sha256": t["sha256"]}
        for t in manifest["tensors"]
    }
    assert got["tensors"] == want


@pytest.mark.crosscheck
def test_run_coreweave_reports_failure():
    proc = run_coreweave(COREWEAVE_VERSIONS[0], "import sys; sys.exit(3)", check=False)
    assert proc.returncode == 3
