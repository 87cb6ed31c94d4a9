"""Tensorized LoRA adapters (issue #7) on real vLLM (CPU): `tensorize_lora_adapter`, the hooks
the plugin installs, remote adapter dirs, the vLLM <= 0.31 helper, the resolver.

A tiny random PEFT LoRA (random lora_B, so it changes the output) is made for the tiny test
Llama and saved as safetensors and .bin. The reference is that safetensors twin loaded by vLLM's
own code: every tensorized copy (local, encrypted, on the moto S3 server, over HTTP) must give
exactly its tokens, through `LLM.generate` (one engine process, engine_ops.py) and through
`vllm serve --enable-lora --lora-modules` (front end, EngineCore, worker), where a wrong key is
also loaded at runtime and must fail clearly while the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import http_server
from safetensors.torch import load_file
from tensorizer_rs import (
    CryptographyError,
    DecryptionParams,
    EncryptionParams,
    TensorDeserializer,
    _native,
)
from tensorizer_rs.stream_io import open_stream
from tensorizer_rs.vllm import (
    TensorizerConfig,
    patches,
    prepare_lora_dir,
    tensorize_lora_adapter,
)
from tensorizer_rs.vllm import lora as tzlora
from tensorizer_rs.vllm.lora.read import _is_encrypted
from vllm_helpers import (
    REPO,
    get_json,
    make_tiny_lora,
    make_tiny_model,
    op_tokens,
    post_json,
    run_ops,
    run_script,
    vllm_env,
    vllm_serve,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def tiny_model(work) -> Path:
    return make_tiny_model(work / "tiny-llama")


@pytest.fixture(scope="module")
def peft(tiny_model, work) -> Path:
    """peft/st (adapter_model.safetensors) and peft/bin (adapter_model.bin)."""
    return make_tiny_lora(tiny_model, work / "peft")


@pytest.fixture(scope="module")
def keys(work) -> dict:
    """a: the key of TENSORIZER_RS_LORA_CONFIG; b: the <= 0.31 helper's; c: a third one, which
    only the "wrong" adapter is encrypted with."""
    out = {}
    for name in "abc":
        path = work / "keys" / f"{name}.key"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(EncryptionParams.random().key)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.bucket("models")
    return s3_server.opts


@pytest.fixture(scope="module")
def adapters(peft, work, keys, s3) -> dict:
    """Every tensorized adapter the tests load; values are what a LoRARequest gets as path (or
    the <= 0.31 config dict)."""
    st = str(peft / "st")
    tz = work / "tz"

    def write(src, out, **cfg):
        tensorize_lora_adapter(src, TensorizerConfig(tensorizer_dir=str(out), **cfg))
        return str(out)

    paths = {
        "st": st,
        "plain": write(st, tz / "plain"),
        "from_bin": write(str(peft / "bin"), tz / "from-bin"),
        "enc": write(st, tz / "enc", encryption_keyfile=keys["a"]),
        "wrong": write(st, tz / "wrong", encryption_keyfile=keys["c"]),
        "s3_plain": write(st, "s3://models/lora/plain", **s3),
        "s3_enc": write(st, "s3://models/lora/enc", encryption_keyfile=keys["a"], **s3),
    }
    # A plain PEFT dir on S3 (fetched whole, then read by vLLM's own code).
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open_stream(f"s3://models/lora/st-remote/{name}", "wb", **s3) as f:
            f.write((peft / "st" / name).read_bytes())
    paths["s3_st"] = "s3://models/lora/st-remote"
    # The vLLM <= 0.31 way: adapter next to the model's URI, config dict with its own key and
    # the S3 credentials (the engine process has no S3_* env: they must come from the dict).
    old = TensorizerConfig(
        tensorizer_uri="s3://models/old/model.tensors", encryption_keyfile=keys["b"], **s3
    )
    old.lora_dir = old.tensorizer_dir
    tensorize_lora_adapter(st, old)
    paths["old"] = {**old.to_serializable(), "lora_dir": old.lora_dir}
    return paths


@pytest.fixture(scope="module")
def http_base(adapters, work):
    with http_server(work / "tz") as base:
        yield f"{base}/data"


@pytest.fixture(scope="module")
def lora_env(work, keys, s3) -> dict:
    """Engine env: adapter key a and the S3 settings in TENSORIZER_RS_LORA_CONFIG, a private
    cache, no S3_* variables."""
    env = vllm_env(
        TENSORIZER_RS_LORA_CONFIG=json.dumps({"encryption_keyfile": keys["a"], **s3}),
        TENSORIZER_RS_LORA_CACHE=str(work / "cache"),
    )
    for k in ("S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def results(tiny_model, adapters, http_base, lora_env) -> dict:
    """One engine (LLM, enable_lora) generating with every adapter; the wrong key last."""
    order = ["st", "plain", "from_bin", "enc", "s3_plain", "s3_enc", "s3_st"]
    specs = [{"name": n, "path": adapters[n]} for n in order]
    specs += [
        {"name": "http_enc", "path": f"{http_base}/enc"},
        {"name": "old", "tensorizer_config": adapters["old"]},
        {"name": "wrong", "path": adapters["wrong"]},
    ]
    out = run_ops([{"op": "lora", "model": str(tiny_model), "adapters": specs}], env=lora_env)
    return out["lora"]


# ----------------------------------------------------------------------------- no engine
def test_tensorize_lora_adapter_writes_config_and_tensors(adapters, peft, keys):
    src = peft / "st"
    want = load_file(str(src / "adapter_model.safetensors"))
    assert len(want) == 2 * 2 * len(TARGETS)  # A and B, 2 layers
    for name, key in (("plain", None), ("from_bin", None), ("enc", keys["a"])):
        d = Path(adapters[name])
        assert sorted(p.name for p in d.iterdir()) == [
            "adapter_config.json",
            "adapter_model.tensors",
        ]
        assert (d / "adapter_config.json").read_bytes() == (
            src / "adapter_config.json"
        ).read_bytes()
        f = _native.TensorFile(str(d / "adapter_model.tensors"))
        assert f.encrypted == (key is not None)
        f.close()
        enc = DecryptionParams.from_key(Path(key).read_bytes()) if key else None
        with TensorDeserializer(
            str(d / "adapter_model.tensors"), device="cpu", encryption=enc
        ) as t:
            assert set(t.keys()) == set(want)
            for k, v in want.items():
                assert torch.equal(t[k], v), k


def test_tensorize_lora_adapter_to_s3_and_lora_dir(adapters, s3, keys):
    """To S3, encrypted; the <= 0.31 `lora_dir` attribute chooses the output dir."""
    for uri, encrypted in (
        ("s3://models/lora/enc", True),
        ("s3://models/old", True),
        ("s3://models/lora/plain", False),
    ):
        with open_stream(f"{uri}/adapter_config.json", **s3) as f:
            assert json.loads(f.read())["peft_type"] == "LORA"
        with open_stream(f"{uri}/adapter_model.tensors", **s3) as f:
            assert f.read(5) == b"|TZR|"
        stream = open_stream(f"{uri}/adapter_model.tensors", **s3)
        assert _is_encrypted(stream) == encrypted
        stream.close()


def test_tensorize_lora_adapter_hub_id_from_cache(peft, tmp_path, monkeypatch):
    """A hub id already in the local HF cache (HF_HUB_OFFLINE=1, as in the tests)."""
    import huggingface_hub.constants as hf

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tzrs--tiny-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(peft / "st", repo / "snapshots" / rev)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    tensorize_lora_adapter("tzrs/tiny-lora", TensorizerConfig(tensorizer_dir=str(tmp_path / "o")))
    with TensorDeserializer(str(tmp_path / "o/adapter_model.tensors"), device="cpu") as t:
        assert len(t) == 2 * 2 * len(TARGETS)
    with pytest.raises(ValueError, match="tzrs/not-cached is neither a local directory"):
        tensorize_lora_adapter("tzrs/not-cached", TensorizerConfig(tensorizer_dir=str(tmp_path)))


def test_tensorize_lora_adapter_needs_safetensors_or_bin(peft, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(peft / "st" / "adapter_config.json", src)
    (src / "adapter_model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        tensorize_lora_adapter(str(src), TensorizerConfig(tensorizer_dir=str(tmp_path / "o")))


def test_read_settings_env_then_sidecar(tmp_path, monkeypatch, keys):
    monkeypatch.setenv(tzlora.CONFIG_ENV, json.dumps({"encryption_keyfile": keys["a"]}))
    d = tmp_path / "a"
    d.mkdir()
    cfg = tzlora.adapter_read_config(str(d))
    assert cfg.tensorizer_uri == str(d / "adapter_model.tensors")
    assert cfg.encryption_keyfile == keys["a"]
    (d / tzlora.SIDECAR).write_text(json.dumps({"encryption_keyfile": keys["b"], "num_readers": 2}))
    cfg = tzlora.adapter_read_config(str(d))
    assert (cfg.encryption_keyfile, cfg.num_readers) == (keys["b"], 2)
    # The env var may also name a JSON file; location fields are per adapter, not for all.
    (tmp_path / "cfg.json").write_text(json.dumps({"tensorizer_uri": "/x/adapter_model.tensors"}))
    monkeypatch.setenv(tzlora.CONFIG_ENV, str(tmp_path / "cfg.json"))
    with pytest.raises(ValueError, match="misplaced keys \\['tensorizer_uri'\\]"):
        tzlora.adapter_read_config(str(d))
    monkeypatch.setenv(tzlora.CONFIG_ENV, '{"encryption_key": "oops"}')
    with pytest.raises(ValueError, match=tzlora.CONFIG_ENV):
        tzlora.adapter_read_config(str(d))


def test_key_errors_name_the_adapter_and_file(adapters, keys, monkeypatch):
    wrong = adapters["wrong"]
    monkeypatch.setenv(tzlora.CONFIG_ENV, json.dumps({"encryption_keyfile": keys["a"]}))
    with pytest.raises(CryptographyError) as e:
        tzlora.load_adapter_tensors(wrong)
    msg = str(e.value)
    assert (
        f"cannot read the LoRA adapter file adapter_model.tensors of {wrong} "
        f"({wrong}/adapter_model.tensors, key file {keys['a']}): "
    ) in msg
    assert "wrong key" in msg
    monkeypatch.delenv(tzlora.CONFIG_ENV)
    with pytest.raises(CryptographyError, match="is encrypted, but no key file is set"):
        tzlora.load_adapter_tensors(wrong)
    # A missing key file is a key problem, not "adapter not found" (vLLM's FileNotFoundError).
    monkeypatch.setenv(tzlora.CONFIG_ENV, '{"encryption_keyfile": "/nonexistent.key"}')
    with pytest.raises(CryptographyError, match="cannot read the key file") as e:
        tzlora.load_adapter_tensors(wrong)
    assert not isinstance(e.value, FileNotFoundError)
    # A key applies to encrypted files only: a plain adapter loads with one configured.
    monkeypatch.setenv(tzlora.CONFIG_ENV, json.dumps({"encryption_keyfile": keys["a"]}))
    assert len(tzlora.load_adapter_tensors(adapters["plain"])) == 2 * 2 * len(TARGETS)


def test_prepare_lora_dir_keeps_credentials_out(adapters, work, monkeypatch, keys):
    monkeypatch.setenv(tzlora.CACHE_ENV, str(work / "cache-prepare"))
    d = Path(prepare_lora_dir(adapters["old"]))
    assert d.parent == work / "cache-prepare"
    side = json.loads((d / tzlora.SIDECAR).read_text())
    assert side["encryption_keyfile"] == keys["b"]
    assert side["tensorizer_uri"] == "adapter_model.tensors"  # fetched into the dir, encrypted
    assert "s3_secret_access_key" not in side and "s3_access_key_id" not in side
    assert _native.TensorFile(str(d / "adapter_model.tensors")).encrypted
    assert tzlora.is_tensorized_adapter_dir(str(d))


# ----------------------------------------------------------------------------- hooks, in-process
def _peft_helper(path):
    from vllm.lora.peft_helper import PEFTHelper

    return PEFTHelper.from_local_dir(path, 512)


def test_hooks_match_this_vllm():
    """The installed vLLM has exactly the signatures every patch was written against."""
    from vllm.config import vllm as vllm_config_module
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora import lora_model, utils, worker_manager
    from vllm.transformers_utils import runai_utils

    def unpatched(fn):  # the plugin may have patched it in this process already
        original = getattr(fn, "_original", fn)
        if isinstance(original, classmethod):  # kept as found in the class
            return original.__get__(None, lora_model.LoRAModel)
        return original

    fns = {
        "LoRAModel.from_local_checkpoint": lora_model.LoRAModel.from_local_checkpoint,
        "LoRAModel.from_lora_tensors": lora_model.LoRAModel.from_lora_tensors,
        "worker_manager.get_adapter_absolute_path": worker_manager.get_adapter_absolute_path,
        "utils.parse_fine_tuned_lora_name": utils.parse_fine_tuned_lora_name,
        "ObjectStorageModel.pull_files": runai_utils.ObjectStorageModel.pull_files,
        "EngineArgs.create_engine_config": EngineArgs.create_engine_config,
        "config.vllm.is_runai_obj_uri": vllm_config_module.is_runai_obj_uri,
    }
    assert set(fns) == set(patches.TESTED_SIGNATURES)
    for what, fn in fns.items():
        assert patches._mismatch(what, unpatched(fn)) is None, what


def test_hook_reads_tensorized_dir_like_vllm_reads_safetensors(adapters, monkeypatch):
    """from_local_checkpoint, hooked, on the tensorized dir == vLLM's own on the twin; the
    unexpected-modules check gives vLLM's error; standard dirs still go to vLLM's code."""
    from vllm.lora import lora_model, worker_manager

    cls = lora_model.LoRAModel
    # Start from vLLM's own functions, even where an earlier test in this process registered
    # the plugin (the hooks keep what they wrap as `_original`).
    raw = cls.__dict__["from_local_checkpoint"]
    monkeypatch.setattr(cls, "from_local_checkpoint", getattr(raw.__func__, "_original", raw))
    fn = worker_manager.get_adapter_absolute_path
    monkeypatch.setattr(worker_manager, "get_adapter_absolute_path", getattr(fn, "_original", fn))
    original = cls.from_local_checkpoint
    # CPU tensors are pinned where vLLM thinks a GPU is (its GPU build, as in the check against
    # newer vLLM on a machine without one); pinning needs a driver, and both sides do it alike.
    monkeypatch.setattr(lora_model, "PIN_MEMORY", False, raising=False)
    assert patches.patch_from_local_checkpoint()
    assert not patches.patch_from_local_checkpoint()  # idempotent
    kw = {"lora_model_id": 1, "device": "cpu", "dtype": torch.bfloat16}
    ref = original(adapters["st"], TARGETS, _peft_helper(adapters["st"]), **kw)
    ours = cls.from_local_checkpoint(
        adapters["plain"], TARGETS, _peft_helper(adapters["plain"]), **kw
    )
    assert sorted(ours.loras) == sorted(ref.loras) and ours.rank == ref.rank == 8
    for name, w in ref.loras.items():
        assert torch.equal(ours.loras[name].lora_a, w.lora_a), name
        assert torch.equal(ours.loras[name].lora_b, w.lora_b), name
        assert ours.loras[name].scaling == w.scaling
    assert cls.from_local_checkpoint(adapters["st"], TARGETS, _peft_helper(adapters["st"]), **kw)
    with pytest.raises(ValueError) as theirs:
        original(adapters["st"], TARGETS - {"down_proj"}, _peft_helper(adapters["st"]), **kw)
    with pytest.raises(ValueError) as mine:
        cls.from_local_checkpoint(
            adapters["plain"], TARGETS - {"down_proj"}, _peft_helper(adapters["plain"]), **kw
        )
    assert str(mine.value) == str(theirs.value).replace(adapters["st"], adapters["plain"])


def test_hook_signature_mismatch_warns_and_leaves_vllm_alone(monkeypatch, caplog):
    from vllm.lora import lora_model, worker_manager

    class Changed(lora_model.LoRAModel):
        @classmethod
        def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, *, new=1):
            return "vLLM's"

    monkeypatch.setattr(lora_model, "LoRAModel", Changed)

    def get_adapter_absolute_path(lora_path, revision=None):
        return lora_path

    monkeypatch.setattr(worker_manager, "get_adapter_absolute_path", get_adapter_absolute_path)
    with caplog.at_level(logging.WARNING, logger="vllm.tensorizer_rs"):
        assert not patches.patch_from_local_checkpoint()
        assert not patches.patch_adapter_path()
    assert Changed.from_local_checkpoint("x", set(), None) == "vLLM's"
    assert worker_manager.get_adapter_absolute_path is get_adapter_absolute_path
    text = caplog.text
    assert "not hooking vLLM's LoRA loading: LoRAModel.from_local_checkpoint has parameters" in text
    assert "'new'" in text and "vLLM's own behaviour is unchanged" in text
    assert (
        "worker_manager.get_adapter_absolute_path has parameters ('lora_path', 'revision')" in text
    )


def test_resolver(adapters, work, s3, monkeypatch):
    monkeypatch.setenv(tzlora.CONFIG_ENV, json.dumps(s3))
    cls = tzlora.TensorizerLoRAResolver
    local = cls(str(work / "tz"))
    remote = cls("s3://models/lora")

    def resolve(r, name):
        return asyncio.run(r.resolve_lora("base", name))

    assert resolve(local, "plain").lora_path == f"{work}/tz/plain"
    assert resolve(remote, "enc").lora_path == "s3://models/lora/enc"
    for name in ("nope", "../tz/plain", "/etc", "s3://models/lora/enc"):
        assert resolve(local, name) is None and resolve(remote, name) is None, name


# ----------------------------------------------------------------------------- LLM.generate
def test_adapter_changes_the_output(results):
    assert op_tokens(results, "st") != results["base"]


@pytest.mark.parametrize(
    "name",
    ["plain", "from_bin", "enc", "s3_plain", "s3_enc", "s3_st", "http_enc", "old"],
)
def test_llm_generate_matches_safetensors_twin(results, name):
    assert op_tokens(results, name) == op_tokens(results, "st")


def test_llm_generate_read_with_our_deserializer(results, work):
    """The tensorized adapters went through our reader (one log line each; decrypted ones say
    so); remote dirs left only adapter_config.json and a sidecar in the cache, no tensors."""
    out = results["out"]
    for d in ("tz/plain", "tz/from-bin", "tz/enc"):
        assert f"tensorizer_rs: loaded LoRA adapter {work}/{d}: 28 tensors" in out, d
    assert out.count("(decrypted)") == 4  # enc, s3_enc, http_enc, old
    fetched = {p.name: sorted(f.name for f in p.iterdir()) for p in (work / "cache").iterdir()}
    assert sorted(fetched.values()) == [
        ["adapter_config.json", "adapter_model.safetensors"],  # s3_st, for vLLM's own reader
        ["adapter_config.json", "adapter_model.tensors", tzlora.SIDECAR],  # old: copied, enc.
        ["adapter_config.json", tzlora.SIDECAR],  # http_enc
        ["adapter_config.json", tzlora.SIDECAR],  # s3_enc
        ["adapter_config.json", tzlora.SIDECAR],  # s3_plain
    ], fetched


def test_llm_wrong_key_is_a_clear_error(results, adapters, keys):
    r = results["wrong"]
    assert r.get("error_type") == "CryptographyError", r
    assert f"adapter_model.tensors of {adapters['wrong']}" in r["error"]
    assert f"key file {keys['a']}" in r["error"] and "wrong key" in r["error"]
    assert results["base_after"] == results["base"]


# ----------------------------------------------------------------------------- vllm serve
def test_vllm_serve(tiny_model, adapters, http_base, lora_env, results, work):
    """--lora-modules with local, encrypted, S3 and HTTP tensorized adapters; runtime loading
    (a wrong key fails with the file named, the server keeps serving); the resolver."""
    base_tokens, lora_tokens = results["base"][0], op_tokens(results, "st")[0]
    env = dict(
        lora_env,
        VLLM_ENABLE_V1_MULTIPROCESSING="1",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="1",
        TENSORIZER_RS_LORA_RESOLVER_DIR="s3://models/lora",
        TENSORIZER_RS_LORA_CACHE=str(work / "cache-serve"),
    )
    modules = {
        "st": adapters["st"],
        "tz": adapters["plain"],
        "enc": adapters["enc"],
        "s3": adapters["s3_enc"],
        "web": f"{http_base}/enc",
    }
    args = [tiny_model, "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "256"]
    args += ["--max-num-seqs", "4", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"]
    args += ["--lora-modules", *(f"{k}={v}" for k, v in modules.items())]
    log_path = work / "serve.log"
    with vllm_serve(args, env=env, log_path=log_path) as url:

        def complete(model):
            body = {
                "model": model,
                "prompt": [1, 10, 20, 30, 40],
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            status, answer = post_json(f"{url}/v1/completions", body)
            assert status == 200, (model, status, answer)
            return answer["choices"][0]["token_ids"]

        assert complete(str(tiny_model)) == base_tokens
        for name in modules:
            assert complete(name) == lora_tokens, name

        status, answer = post_json(
            f"{url}/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": adapters["wrong"]}
        )
        assert status >= 400, answer
        # vLLM scrubs paths from HTTP errors; the file's name and the reason stay.
        text = answer["error"]["message"]
        assert "cannot read the LoRA adapter file adapter_model.tensors" in text, text
        assert "wrong key" in text, text
        assert complete(str(tiny_model)) == base_tokens  # still serving
        assert "bad" not in [m["id"] for m in get_json(f"{url}/v1/models")["data"]]

        status, answer = post_json(
            f"{url}/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": adapters["from_bin"]}
        )
        assert status == 200, answer
        assert complete("rt") == lora_tokens
        assert complete("plain") == lora_tokens  # resolver: s3://models/lora/plain
    log = log_path.read_text()
    assert f"adapter_model.tensors of {adapters['wrong']}" in log  # full paths in the log
    assert "tensorizer_rs: loaded LoRA adapter" in log and "(decrypted)" in log
    assert "tensorizer_rs: LoRA resolver for adapters under s3://models/lora" in log


# ----------------------------------------------------------------------------- example script
def test_example_script_lora_path(tiny_model, peft, work):
    """examples/tensorize_vllm_model.py --lora-path: the adapter is written next to the model,
    encrypted with the model's key, and `deserialize --lora-path` generates with it."""
    script = REPO / "examples" / "tensorize_vllm_model.py"
    engine = ["--model", tiny_model, "--dtype", "bfloat16", "--enforce-eager"]
    engine += ["--max-model-len", "256", "--max-num-seqs", "4", "--max-lora-rank", "8"]
    engine += ["--lora-path", peft / "st"]
    key = work / "example.key"
    run_script(
        [script, *engine, "serialize", "--serialized-directory", work / "example"]
        + ["--suffix", "v1", "--keyfile", key]
    )
    d = Path(f"{work}/example/vllm/{tiny_model}/v1")
    assert {"model.tensors", "adapter_config.json", "adapter_model.tensors"} <= {
        p.name for p in d.iterdir()
    }
    assert _native.TensorFile(str(d / "adapter_model.tensors")).encrypted
    out = run_script(
        [script, *engine, "deserialize", "--serialized-directory", d, "--keyfile", key],
        env=vllm_env(TENSORIZER_RS_LORA_CACHE=str(work / "cache-example")),
    )
    text = out.stdout + out.stderr
    assert "tensorizer_rs: loaded LoRA adapter" in text and "(decrypted)" in text
    assert "LoRA output token ids:" in text
    assert os.path.isdir(work / "cache-example")
