"""TensorizerConfig / TensorizerArgs / loader plumbing, without starting an engine.

The comparisons with vLLM's own classes are marked `vllm`; the rest needs only tensorizer_rs.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from tensorizer_rs import DecryptionParams, TensorSerializer
from tensorizer_rs.vllm import (
    PRE_PROCESSING_MARKER,
    TensorizerArgs,
    TensorizerConfig,
    is_vllm_tensorized,
)
from tensorizer_rs.vllm.config import _probe, validate_config
from torch import nn

TEMPLATE_ERROR = (
    "For a sharded model, tensorizer_uri should include a string format template like '%04d' "
    "to be formatted with the rank of the shard"
)


class _Parallel:
    def __init__(self, tp):
        self.tensor_parallel_size = tp


# ----------------------------------------------------------------------------- TensorizerConfig
def test_uri_dir_resolution(caplog):
    assert TensorizerConfig(tensorizer_dir="/m").tensorizer_uri == "/m/model.tensors"
    assert TensorizerConfig(tensorizer_uri="s3://b/x/model.tensors").tensorizer_dir == "s3://b/x"
    with caplog.at_level(logging.WARNING, logger="vllm.tensorizer_rs"):
        both = TensorizerConfig(tensorizer_uri="/a/model.tensors", tensorizer_dir="/other")
    assert both.tensorizer_dir == "/a"
    assert "Provided both tensorizer_dir and tensorizer_uri" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vllm.tensorizer_rs"):
        one = TensorizerConfig(tensorizer_uri="/a/model-%03d.tensors")
        one.for_rank(1)
        TensorizerConfig(**{**one.to_serializable(), "tensorizer_dir": "/a/"})
    assert caplog.text == ""  # a URI alone, a copy or an agreeing dir: nothing to warn about
    with pytest.raises(ValueError, match="Unable to resolve tensorizer_uri. A valid"):
        TensorizerConfig()


def test_defaults_and_serializable_form():
    cfg = TensorizerConfig(tensorizer_uri="/a/model.tensors", num_readers=2)
    assert cfg.serialization_kwargs == {} and cfg.deserialization_kwargs == {}
    assert cfg.to_serializable() == {
        "tensorizer_uri": "/a/model.tensors",
        "num_readers": 2,
        "serialization_kwargs": {},
        "deserialization_kwargs": {},
    }
    again = TensorizerConfig(**cfg.to_serializable())
    assert again.to_serializable() == cfg.to_serializable()


def test_sharded_template():
    cfg = TensorizerConfig(tensorizer_uri="/a/model-rank-%03d.tensors")
    assert cfg._is_sharded
    cfg.verify_with_parallel_config(_Parallel(2))
    assert cfg.for_rank(1).tensorizer_uri == "/a/model-rank-001.tensors"
    assert cfg.tensorizer_uri == "/a/model-rank-%03d.tensors"  # a copy; the original keeps it
    plain = TensorizerConfig(tensorizer_uri="/a/model.tensors")
    assert plain.for_rank(1).tensorizer_uri == "/a/model.tensors"
    plain.verify_with_parallel_config(_Parallel(1))
    with pytest.raises(ValueError) as e:
        plain.verify_with_parallel_config(_Parallel(2))
    assert str(e.value) == TEMPLATE_ERROR


@pytest.mark.parametrize("key", ["device", "dtype", "mode"])
def test_blacklisted_keys(key):
    validate_config({key: None, "tensorizer_uri": "x"})  # None is allowed
    with pytest.raises(ValueError) as e:
        validate_config({key: "x"})
    assert str(e.value) == f"{key} is not an allowed Tensorizer argument."


def test_mapping_interface():
    cfg = TensorizerConfig(tensorizer_uri="/a/model.tensors")
    assert set(cfg.keys()) >= {"tensorizer_uri", "num_readers", "model_class", "_is_sharded"}
    assert len(cfg) == len(cfg._fields)
    assert cfg["tensorizer_uri"] == "/a/model.tensors"
    cfg["num_readers"] = 3
    assert cfg.num_readers == 3
    with pytest.raises(KeyError):
        cfg["nope"]
    with pytest.raises(KeyError):
        cfg["nope"] = 1


def test_tensorizer_args(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", "https://env.example")
    key = tmp_path / "k.key"
    key.write_bytes(bytes(range(32)))
    cfg = TensorizerConfig(
        tensorizer_uri="/a/model.tensors",
        s3_access_key_id="id",
        stream_kwargs={"force_http": True},
        verify_hash=True,
        encryption_keyfile=str(key),
        deserialization_kwargs={"num_readers": 4},
    )
    args = TensorizerArgs(cfg)
    assert args.stream_kwargs == {
        "s3_access_key_id": "id",
        "s3_secret_access_key": None,
        "s3_endpoint": None,  # the env var fills the attribute only, as in vLLM
        "force_http": True,
    }
    assert args.s3_endpoint == "https://env.example"
    assert args.deserialization_kwargs["verify_hash"] is True
    assert args.deserialization_kwargs["num_readers"] == 4
    assert isinstance(args.deserialization_kwargs["encryption"], DecryptionParams)
    # the reader opens plain URIs itself (a stream only when stream options are set)
    bare = TensorizerArgs(TensorizerConfig(tensorizer_uri="/a/model.tensors"))
    assert bare.source() == "/a/model.tensors"


# ----------------------------------------------------------------------------- marker detection
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("buf", torch.arange(4.0))


def _write_module(path, marker):
    m = _Tiny()
    if marker is not None:
        m.register_parameter("vllm_tensorized_marker", nn.Parameter(marker, requires_grad=False))
    s = TensorSerializer(str(path))
    s.write_module(m)
    s.close()
    return m


def test_is_vllm_tensorized_and_marker_value(tmp_path):
    ours = tmp_path / "ours.tensors"
    _write_module(ours, torch.tensor([PRE_PROCESSING_MARKER]))
    vllms = tmp_path / "vllm.tensors"
    _write_module(vllms, torch.tensor((1,), device="meta"))
    hf = tmp_path / "hf.tensors"
    s = TensorSerializer(str(hf))
    s.write_state_dict({"lin.weight": torch.ones(2, 3)})
    s.close()

    assert is_vllm_tensorized(TensorizerConfig(tensorizer_uri=str(ours)))
    assert is_vllm_tensorized(TensorizerConfig(tensorizer_uri=str(vllms)))
    assert not is_vllm_tensorized(TensorizerConfig(tensorizer_uri=str(hf)))
    assert is_vllm_tensorized(TensorizerConfig(tensorizer_uri=str(hf), vllm_tensorized=True))

    keys, value = _probe(TensorizerConfig(tensorizer_uri=str(ours)), read_marker=True)
    assert value == PRE_PROCESSING_MARKER
    assert keys == {".vllm_tensorized_marker", "lin.weight", "lin.bias", ".buf"}
    assert _probe(TensorizerConfig(tensorizer_uri=str(vllms)), read_marker=True)[1] == 0
    assert _probe(TensorizerConfig(tensorizer_uri=str(hf)), read_marker=True)[1] is None


def test_bad_stream_kwargs_fail_in_open_stream(tmp_path):
    path = tmp_path / "ours.tensors"
    _write_module(path, torch.tensor([PRE_PROCESSING_MARKER]))
    cfg = TensorizerConfig(tensorizer_uri=str(path), stream_kwargs={"mode": "foo"})
    with pytest.raises(ValueError, match="foo"):
        is_vllm_tensorized(cfg)


# ----------------------------------------------------------------------------- vs vLLM, loader
@pytest.mark.vllm
def test_same_fields_and_forms_as_vllm():
    from vllm.model_executor.model_loader import tensorizer as vllm_tz

    assert TensorizerConfig._fields == vllm_tz.TensorizerConfig._fields
    for kw in (
        {"tensorizer_uri": "/a/model.tensors"},
        {"tensorizer_dir": "/a", "num_readers": 1, "verify_hash": True},
        {"tensorizer_uri": "s3://b/m-%02d.tensors", "s3_endpoint": "e", "stream_kwargs": {}},
    ):
        ours, theirs = TensorizerConfig(**kw), vllm_tz.TensorizerConfig(**kw)
        assert ours.to_serializable() == theirs.to_serializable()
        assert ours._is_sharded == theirs._is_sharded
        assert dict(ours) == dict(theirs)


@pytest.mark.vllm
def test_loader_reads_engine_args_extra_config(tmp_path):
    from tensorizer_rs.vllm.loader import TensorizerRsLoader
    from vllm.engine.arg_utils import EngineArgs

    def loader(extra):
        args = EngineArgs(
            model=str(tmp_path), load_format="tensorizer", model_loader_extra_config=extra
        )
        return TensorizerRsLoader(args.create_load_config())

    ld = loader(
        {
            "tensorizer_uri": "/x/model-%03d.tensors",
            "num_readers": 2,
            "tensorizer_config": {"ignored": "by vLLM"},
        }
    )
    assert ld.tensorizer_config.tensorizer_uri == "/x/model-%03d.tensors"
    assert ld.tensorizer_config.num_readers == 2
    assert ld.post_process_override is None
    # no distributed state: rank 0
    assert ld._config_for_this_rank().tensorizer_uri == "/x/model-000.tensors"
    assert loader({}).tensorizer_config.tensorizer_uri == f"{tmp_path}/model.tensors"
    assert loader({"process_weights_after_loading": True}).post_process_override is True
    with pytest.raises(ValueError, match="must be true, false or absent"):
        loader({"process_weights_after_loading": "yes"})
    with pytest.raises(ValueError, match="dtype is not an allowed Tensorizer argument."):
        loader({"dtype": "float16"})
    # a TensorizerConfig object (ours) goes through to_serializable, like vLLM's
    ld = loader(TensorizerConfig(tensorizer_uri="/y/model.tensors", verify_hash=True))
    assert ld.tensorizer_config.verify_hash is True


@pytest.mark.vllm
def test_release_file_tensors():
    from tensorizer_rs.vllm.fill import release_file_tensors

    m = _Tiny()
    release_file_tensors(m, frozenset({"lin.weight", "lin.bias", ".buf"}))
    assert m.lin.weight.is_meta and m.lin.bias.is_meta and m.buf.is_meta

    m = _Tiny()
    release_file_tensors(m, frozenset({"lin.weight", "lin.bias"}))
    assert m.buf.tolist() == [0.0, 1.0, 2.0, 3.0]  # not in the file: the constructor's value

    with pytest.raises(ValueError, match=r"Missing: \['lin.bias'\]"):
        release_file_tensors(_Tiny(), frozenset({"lin.weight", ".buf"}))

    # Tensors the reader will fill in place stay where the constructor put them.
    m = _Tiny()
    weight = m.lin.weight
    release_file_tensors(
        m, frozenset({"lin.weight", "lin.bias"}), keep=lambda n, t: n == "lin.weight"
    )
    assert m.lin.weight is weight and m.lin.bias.is_meta


# ----------------------------------------------------------------------------- s3:// model dirs
# Against the S3 test server (tests/conftest.py: s3_server), credentials from the environment as
# vLLM users set them.
@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    s3_server.bucket("objstore")
    return s3_server


def _put(s3, uri, data: bytes):
    from tensorizer_rs.stream_io import open_stream

    with open_stream(uri, "wb", **s3.opts) as f:
        f.write(data)


def test_objstore_pull_files(tmp_path, s3_env, caplog):
    from tensorizer_rs.vllm.objstore import pull_files

    for name in ("config.json", "tokenizer.json", "model.safetensors", "custom.txt"):
        _put(s3_env, f"s3://objstore/m/{name}", name.encode())
    dest = tmp_path / "dest"
    dest.mkdir()
    got = pull_files("s3://objstore/m/", str(dest), allow_pattern=["*.json", "*.model"])
    assert got == ["config.json", "tokenizer.json"]
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "tokenizer.json"]
    assert (dest / "tokenizer.json").read_bytes() == b"tokenizer.json"
    assert pull_files("s3://objstore/m", str(dest), ignore_pattern=["*.json"]) == []
    assert pull_files("s3://objstore/m", str(dest), skip={"config.json"}) == ["tokenizer.json"]
    with pytest.raises(FileNotFoundError, match="s3://objstore/nothing/config.json"):
        pull_files("s3://objstore/nothing", str(dest))


def test_objstore_credentials(tmp_path, s3_env, monkeypatch):
    """Wrong credentials: a clear error at config.json (no secret in it); explicit storage
    options (the extra config's, see storage_options_of) win over the environment."""
    from tensorizer_rs.vllm.objstore import pull_files, storage_options_of

    _put(s3_env, "s3://objstore/c/config.json", b"{}")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(OSError, match="access denied") as e:
        pull_files("s3://objstore/c", str(tmp_path))
    assert "s3://objstore/c/config.json" in str(e.value) and "S3_ACCESS_KEY_ID" in str(e.value)
    assert "wrong-secret" not in str(e.value) and s3_env.secret_key not in str(e.value)
    extra = {
        "s3_access_key_id": s3_env.access_key,
        "s3_secret_access_key": s3_env.secret_key,
        "stream_kwargs": {"mode": "rb", "s3_endpoint": s3_env.endpoint},
        "num_readers": 2,
    }
    storage = storage_options_of(extra)
    assert storage == {
        "s3_access_key_id": s3_env.access_key,
        "s3_secret_access_key": s3_env.secret_key,
        "s3_endpoint": s3_env.endpoint,
    }
    assert storage_options_of(TensorizerConfig(tensorizer_uri="s3://x/m.tensors")) == {}
    assert pull_files("s3://objstore/c", str(tmp_path), storage=storage) == ["config.json"]


@pytest.mark.vllm
def test_objstore_patches_vllm_object_storage_model(tmp_path, s3_env, monkeypatch):
    from tensorizer_rs.vllm import patches
    from vllm.transformers_utils import runai_utils

    # vLLM's own pull_files (the plugin may have patched it already in this process)
    current = runai_utils.ObjectStorageModel.pull_files
    monkeypatch.setattr(
        runai_utils.ObjectStorageModel, "pull_files", getattr(current, "_original", current)
    )
    assert patches.patch_pull_files()
    assert not patches.patch_pull_files()  # once
    _put(s3_env, "s3://objstore/v/config.json", b"{}")
    _put(s3_env, "s3://objstore/v/tokenizer.json", b"{}")
    monkeypatch.setenv("VLLM_ASSETS_CACHE", str(tmp_path / "cache"))
    osm = runai_utils.ObjectStorageModel(url="s3://objstore/v")
    osm.pull_files("s3://objstore/v", allow_pattern=["config.json"])
    assert os.listdir(osm.dir) == ["config.json"]
    osm.pull_files("s3://objstore/v", ignore_pattern=["*.tensors"])
    assert sorted(os.listdir(osm.dir)) == ["config.json", "tokenizer.json"]
    assert osm._tensorizer_rs_fetched == {"config.json", "tokenizer.json"}
