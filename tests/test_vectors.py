"""Every golden vector written by CoreWeave's tensorizer loads with the manifest's exact bytes;
every negative vector fails the documented way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import decryption_for, entry_key, lookup, sha256
from tensorizer_rs import (
    CryptographyError,
    HashMismatchError,
    TensorDeserializer,
    TensorizerError,
    _native,
)

POSITIVE = "ok"


def _ok(manifest):
    exp = manifest["expect"]
    return (
        all(exp[k] == POSITIVE for k in ("open", "load", "verify_hash"))
        or exp.get("spec_correct_reader") == POSITIVE
    )


def test_header_and_index_match_manifest(vector):
    f = _native.TensorFile(vector["path"])
    assert f.version == vector["header_version"]
    assert f.flags == vector["feature_flags"]
    assert f.index_len == vector["metadata_reserved_len"]
    entries = f.entries()
    assert len(entries) == vector["tensor_count"] == len(vector["tensors"])
    for e, m in zip(entries, vector["tensors"]):
        assert e["name_bytes"].hex() == m["name_bytes_hex"]
        assert e["name"] == entry_key(m)
        assert e["dtype"] == m["dtype_string"].encode("latin-1")
        assert list(e["shape"]) == m["shape"]
        assert e["tensor_type"] == m["tensor_type_code"]
        assert (e["header_offset"], e["data_offset"], e["data_length"]) == (
            m["header_offset"],
            m["data_offset"],
            m["data_length"],
        )
        assert e["entry_version"] == m["metadata_entry_version"]


def _check_loaded(d, manifest):
    for m in manifest["tensors"]:
        t = lookup(d, entry_key(m))
        assert str(t.dtype) == "torch." + m["dtype"], m["name"]
        assert list(t.shape) == m["shape"], m["name"]
        assert t.device.type == "cpu"
        assert sha256(t) == m["sha256"], m["name"]


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_positive_vectors_load_exact_bytes(vector, vectors_dir, lazy):
    if not _ok(vector):
        pytest.skip("negative vector")
    enc = decryption_for(vector, Path(vectors_dir))
    d = TensorDeserializer(
        vector["path"], device="cpu", verify_hash=True, lazy_load=lazy, encryption=enc
    )
    _check_loaded(d, vector)
    d.close()


def test_load_into_module_for_module_files(vector, vectors_dir):
    if not _ok(vector) or not all(
        t["tensor_type"] in ("param", "buffer") for t in vector["tensors"]
    ):
        pytest.skip("not a write_module file")
    root = torch.nn.Module()
    for m in vector["tensors"]:
        prefix = m["name"].rpartition(".")[0]
        node = root
        for part in filter(None, prefix.split(".")):
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
    enc = decryption_for(vector, Path(vectors_dir))
    n = TensorDeserializer(
        vector["path"], device="cpu", lazy_load=True, encryption=enc
    ).load_into_module(root)
    assert n == len(vector["tensors"])
    state = dict(root.named_parameters())
    state.update(dict(root.named_buffers()))
    for m in vector["tensors"]:
        key = m["name"].removeprefix(".")
        assert sha256(state[key]) == m["sha256"], key
        assert (m["tensor_type"] == "param") == (key in dict(root.named_parameters()))


def test_corrupt_data_fails_only_with_verify_hash(vector_manifests):
    v = vector_manifests["corrupt_data.tensors"]
    d = TensorDeserializer(v["path"], device="cpu")  # loads without verification
    assert set(d.keys()) == {t["name"] for t in v["tensors"]}
    with pytest.raises(HashMismatchError) as err:
        TensorDeserializer(v["path"], device="cpu", verify_hash=True)
    msg = str(err.value)
    assert "weight" in msg and "corrupt_data.tensors" in msg
    assert isinstance(err.value, TensorizerError)


def test_encrypted_file_without_key_is_a_clear_error(vector_manifests):
    for v in vector_manifests.values():
        if not v.get("encryption"):
            continue
        with pytest.raises(CryptographyError, match="encrypted, but no decryption key"):
            TensorDeserializer(v["path"], device="cpu")


def test_tampered_vector_fails_authentication(vector_manifests, vectors_dir):
    v = vector_manifests["enc_tampered.tensors"]
    enc = decryption_for(v, Path(vectors_dir))
    for verify in (False, True):
        with pytest.raises(CryptographyError, match="authentication failed") as err:
            TensorDeserializer(v["path"], device="cpu", encryption=enc, verify_hash=verify)
        assert "enc_f32" in str(err.value)


def test_quirk_vector_opens_here(vector_manifests):
    """CoreWeave's own reader cannot open it (TypeError); a spec-correct reader can."""
    v = vector_manifests["quirk_empty_opaque.tensors"]
    d = TensorDeserializer(v["path"], device="cpu", verify_hash=True)
    _check_loaded(d, v)
