"""API parity with CoreWeave's tensorizer 2.12.1, by introspection of the real package.

``tests/parity_introspect.py`` describes a package's public modules, ``__all__``, names,
classes (members, kinds, signatures, enum members, named-tuple fields, standard bases) in a
subprocess, for CoreWeave's and for ours; anything CoreWeave has that we lack or declare
differently fails here, so the list cannot drift. We may add names, members, and trailing
keyword-only parameters with defaults. The few deliberate gaps are in ``ALLOWED`` below, each
listed in docs/format.md with its reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TZ_CACHE, run_coreweave

pytestmark = pytest.mark.crosscheck

INTROSPECT = Path(__file__).with_name("parity_introspect.py")
GRPCIO_TOOLS = TZ_CACHE / "grpcio-tools-1.62.3"

# Names of CoreWeave's we deliberately do not provide (docs/format.md, "API parity").
ALLOWED = {
    "serialization.lz4": "missing",
    "utils.pynvml": "missing",
}


def _ours(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def apis():
    theirs = json.loads(run_coreweave("2.12.1", INTROSPECT.read_text(), "tensorizer").stdout)
    proc = _ours(INTROSPECT.read_text(), "tensorizer_rs")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return theirs, json.loads(proc.stdout)


def _signature_problem(theirs, ours) -> str | None:
    if theirs == ours or theirs is None:
        return None
    if ours is None or ours[: len(theirs)] != theirs:
        return f"signature {theirs} != ours {ours}"
    extra = ours[len(theirs) :]
    if any(kind not in ("KEYWORD_ONLY", "VAR_KEYWORD") for _, kind, _ in extra) or any(
        kind == "KEYWORD_ONLY" and default is None for _, kind, default in extra
    ):
        return f"signature {theirs}: ours adds required or positional parameters {extra}"
    return None


def _compare(path: str, theirs: dict, ours: dict | None, problems: dict) -> None:
    if ours is None:
        problems[path] = "missing"
        return
    if theirs["kind"] != ours["kind"]:
        problems[path] = f"a {theirs['kind']}, ours is a {ours['kind']}"
        return
    why = _signature_problem(theirs.get("signature"), ours.get("signature"))
    if why:
        problems[path] = why
    value = (theirs.get("type"), theirs.get("value"))
    if theirs["kind"] == "value" and value != (ours.get("type"), ours.get("value")):
        problems[path] = f"{value} != ours {(ours.get('type'), ours.get('value'))}"
    if theirs["kind"] == "class":
        for key in ("enum", "fields"):
            if theirs.get(key) != ours.get(key):
                problems[f"{path} {key}"] = f"{theirs.get(key)} != ours {ours.get(key)}"
        missing = sorted(set(theirs["bases"]) - set(ours["bases"]))
        if missing:
            problems[f"{path} bases"] = f"lacks {missing}"
        for name, member in theirs["members"].items():
            _compare(f"{path}.{name}", member, ours["members"].get(name), problems)


def test_every_public_name_of_2_12_1(apis):
    theirs, ours = apis
    problems: dict = {}
    for module, t in theirs.items():
        o = ours[module]
        label = module or "tensorizer_rs"
        assert "error" not in t, f"CoreWeave's {label}: {t}"
        if "error" in o:
            problems[label] = o["error"]
            continue
        if t["all"] is not None:
            lacking = sorted(set(t["all"]) - set(o["all"] or ()))
            if lacking:
                problems[f"{label}.__all__"] = f"lacks {lacking}"
        for name, entry in t["names"].items():
            _compare(f"{module}.{name}" if module else name, entry, o["names"].get(name), problems)
    unexpected = {k: v for k, v in problems.items() if ALLOWED.get(k) != v}
    assert not unexpected, "differences from tensorizer 2.12.1:\n" + "\n".join(
        f"  {k}: {v}" for k, v in sorted(unexpected.items())
    )
    stale = sorted(set(ALLOWED) - set(problems))
    assert not stale, f"allowed differences that no longer exist (drop them): {stale}"


def test_allowed_differences_are_documented():
    doc = (REPO_ROOT / "docs" / "format.md").read_text()
    for name in ALLOWED:
        assert f"`{name}`" in doc, (
            f"{name} is allowed to differ but docs/format.md does not say why"
        )


def test_package_import_is_eager_and_torch_free():
    """`import tensorizer_rs` binds its submodules (as 2.12.1's) without importing torch, numpy,
    redis or protobuf; `from tensorizer_rs import *` brings protobuf and tensors_pb2 too."""
    proc = _ours(
        "import sys, tensorizer_rs as tz\n"
        "print([m for m in ('torch', 'numpy', 'redis', 'google.protobuf') if m in sys.modules])\n"
        "print(tz.serialization.TensorDeserializer is tz.TensorDeserializer,"
        " tz.utils.convert_bytes(1536), tz.stream_io.open_stream.__name__,"
        " tz.torch_compat.tensorizer_saving.__name__)\n"
        "ns = {}\n"
        "exec('from tensorizer_rs import *', ns)\n"
        "print(sorted(k for k in ('protobuf', 'tensors_pb2', 'utils', 'stream_io',"
        " 'torch_compat', 'FilterFuncType') if k in ns))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "[]",
        "True 1.5 KB open_stream tensorizer_saving",
        "['FilterFuncType', 'protobuf', 'stream_io', 'tensors_pb2', 'torch_compat', 'utils']",
    ]


# ----------------------------------------------------------------------------- protobuf
def test_tensors_pb2_descriptor_is_coreweaves():
    """The generated module describes exactly CoreWeave's messages (the serialized
    FileDescriptorProto is byte-identical) and its enums have the same values."""
    script = (
        "import sys, importlib\n"
        "pb = importlib.import_module(sys.argv[1] + '.tensors_pb2')\n"
        "print(pb.DESCRIPTOR.serialized_pb.hex())\n"
        "print(sorted(pb.Dtype.items()), sorted(pb.AttributeType.items()))\n"
        "print(pb.Tensor.DESCRIPTOR.full_name, pb.Tensor.__module__, pb.Module.__module__)\n"
    )
    theirs = run_coreweave("2.12.1", script, "tensorizer").stdout
    ours = _ours(script, "tensorizer_rs")
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs


def test_tensors_pb2_is_what_protoc_generates():
    """tensors_pb2.py is protoc's output for tensors.proto (scripts/gen-protobuf.sh --check,
    with the pinned grpcio-tools that scripts/setup-env.sh installs)."""
    if not (GRPCIO_TOOLS / "grpc_tools").is_dir():
        message = f"grpcio-tools is not installed at {GRPCIO_TOOLS}; run scripts/setup-env.sh"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gen-protobuf.sh"), "--check"],
        capture_output=True,
        text=True,
        env={**os.environ, "TZ_CACHE": str(TZ_CACHE), "VENV": str(Path(sys.executable).parents[1])},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
