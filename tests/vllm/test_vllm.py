"""tensorizer_rs as vLLM's load_format="tensorizer", end to end on real vLLM (CPU).

Every engine runs in a subprocess. Most operations share one process (engine_ops.py with the
engine in-process, ~3 s per LLM); `vllm serve` and tensor parallelism use vLLM's usual
multi-process layout, so the plugin is also exercised in EngineCore and worker processes.
The reference is the same tiny model loaded from its safetensors.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
from conftest import run_coreweave
from helpers import sha256
from tensorizer_rs import (
    DecryptionParams,
    EncryptionParams,
    TensorDeserializer,
    TensorSerializer,
)
from tensorizer_rs.vllm import (
    MARKER_KEY,
    PRE_PROCESSING_MARKER,
    TensorizerConfig,
    is_vllm_tensorized,
)
from vllm_helpers import (
    HERE,
    REPO,
    TINY_SERVE_ARGS,
    complete,
    make_tiny_model,
    op_error,
    op_tokens,
    run_ops,
    run_script,
    vllm_env,
    vllm_serve,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _encryption_available() -> bool:
    try:
        s = TensorSerializer(io.BytesIO(), encryption=EncryptionParams.random())
        s.write_state_dict({"t": torch.ones(2)})
        s.close()
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False
    return True


ENCRYPTION = _encryption_available()
needs_encryption = pytest.mark.skipif(
    not ENCRYPTION, reason="this build of tensorizer_rs cannot encrypt yet"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-work")


@pytest.fixture(scope="module")
def coreweave_files(tiny_model, work) -> Path:
    """vLLM-tensorized files of the tiny model written by CoreWeave tensorizer 2.10.1."""
    out = work / "coreweave"
    run_coreweave(
        "2.10.1",
        (HERE / "coreweave_write.py").read_text(),
        tiny_model,
        out,
        env=vllm_env(),
        timeout=600,
    )
    return out


@pytest.fixture(scope="module")
def results(tiny_model, work, coreweave_files) -> dict:
    m, w, cw = str(tiny_model), str(work), str(coreweave_files)

    def load(name, model=m, **extra):
        return {
            "op": "generate",
            "name": name,
            "model": model,
            "load_format": "tensorizer",
            "extra": extra,
        }

    plain = f"{w}/plain/model.tensors"
    ops = [
        {"op": "generate", "name": "reference", "model": m},
        {
            "op": "generate",
            "name": "serialize_loader",
            "model": m,
            "load_format": "tensorizer_rs_serialize",
            "extra": {"tensorizer_config": {"tensorizer_uri": f"{w}/direct/model.tensors"}},
        },
        {
            "op": "tensorize",
            "name": "tensorize_plain",
            "model": m,
            "config": {"tensorizer_uri": plain},
        },
        {"op": "write_hf", "name": "write_hf", "model": m, "uri": f"{w}/hf/model.tensors"},
        {
            "op": "tensorize",
            "name": "tensorize_template_tp2",
            "model": m,
            "tp": 2,
            "config": {"tensorizer_uri": f"{w}/notemplate/model.tensors"},
        },
        load("load_dir", model=f"{w}/plain"),
        {**load("load_config_object", tensorizer_uri=plain), "extra_as_config": True},
        load("load_hf", tensorizer_uri=f"{w}/hf/model.tensors", num_readers=1),
        load(
            "load_cw_vllm_builtin",
            tensorizer_uri=f"{cw}/vllm-builtin/model.tensors",
            process_weights_after_loading=True,
        ),
        load("load_cw_pre_marker", tensorizer_uri=f"{cw}/pre-marker/model.tensors"),
        load("err_device", tensorizer_uri=plain, device="cpu"),
        load("err_dtype", tensorizer_uri=plain, dtype="float32"),
        load("err_mode", tensorizer_uri=plain, mode="rb"),
        load(
            "err_num_readers", tensorizer_uri=plain, deserialization_kwargs={"num_readers": "bar"}
        ),
        load("err_stream_mode", tensorizer_uri=plain, stream_kwargs={"mode": "foo"}),
        load("err_no_file", tensorizer_uri=f"{w}/nothing-here/model.tensors"),
        {
            "op": "generate",
            "name": "err_auto",
            "model": m,
            "extra_as_config": True,
            "extra": {"tensorizer_uri": "test"},
        },
        {
            "op": "generate",
            "name": "err_safetensors",
            "model": m,
            "load_format": "safetensors",
            "extra_as_config": True,
            "extra": {"tensorizer_uri": "test"},
        },
    ]
    if ENCRYPTION:
        key = f"{w}/enc/model.key"
        ops += [
            {
                "op": "tensorize",
                "name": "tensorize_enc",
                "model": m,
                "config": {"tensorizer_uri": f"{w}/enc/model.tensors", "encryption_keyfile": key},
            },
            load("load_enc", model=f"{w}/enc", encryption_keyfile=key),
            load("err_enc_no_key", model=f"{w}/enc"),
            load(
                "load_cw_encrypted",
                tensorizer_uri=f"{cw}/encrypted/model.tensors",
                encryption_keyfile=f"{cw}/encrypted/model.key",
            ),
        ]
    return run_ops(ops)


# ----------------------------------------------------------------------------- serialize + load
def test_reference_loads(results):
    assert len(op_tokens(results, "reference")) == 2


def test_serialize_loader_serves_the_checkpoint(results, work):
    assert op_tokens(results, "serialize_loader") == op_tokens(results, "reference")
    assert (work / "direct" / "model.tensors").is_file()


def test_tensorize_vllm_model_writes_marker_and_artifacts(results, work):
    assert "error" not in results["tensorize_plain"], results["tensorize_plain"]
    d = work / "plain"
    names = sorted(p.name for p in d.iterdir())
    assert {"model.tensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        names
    ), names
    assert not any(n.endswith(".safetensors") for n in names), names
    cfg = TensorizerConfig(tensorizer_uri=str(d / "model.tensors"))
    assert is_vllm_tensorized(cfg)
    with TensorDeserializer(str(d / "model.tensors"), device="cpu", lazy_load=True) as t:
        marker = t[MARKER_KEY]
        assert marker.dtype == torch.int64 and marker.tolist() == [PRE_PROCESSING_MARKER]
        # vLLM module names, weights before post-processing (CPU packing would empty them)
        qkv = t["model.layers.0.self_attn.qkv_proj.weight"]
        assert qkv.shape == (128 + 2 * 64, 128) and qkv.dtype == torch.bfloat16


def test_load_vllm_tensorized_dir(results):
    """LLM(dir, load_format="tensorizer") on our tensorize_vllm_model output."""
    assert op_tokens(results, "load_dir") == op_tokens(results, "reference")
    out = results["load_dir"]["out"]
    # One INFO line for the load, naming what was loaded and how.
    lines = re.findall(r"tensorizer_rs: deserialized \d+ bytes .* in [\d.]+ s, [\d.]+ GB/s.*", out)
    assert len(lines) == 1, lines
    assert lines[0].endswith("(pre-processing vLLM module, post-processed after loading)")


def test_load_with_tensorizer_config_object(results):
    assert op_tokens(results, "load_config_object") == op_tokens(results, "reference")


def test_load_hf_layout_file(results, work):
    """A state dict with HF names (no marker) goes through model.load_weights."""
    assert not is_vllm_tensorized(TensorizerConfig(tensorizer_uri=str(work / "hf/model.tensors")))
    assert op_tokens(results, "load_hf") == op_tokens(results, "reference")


def test_load_coreweave_written_files(results, coreweave_files):
    """Files written by CoreWeave tensorizer 2.10.1's TensorSerializer.write_module."""
    builtin = TensorizerConfig(tensorizer_uri=str(coreweave_files / "vllm-builtin/model.tensors"))
    assert is_vllm_tensorized(builtin)
    with TensorDeserializer(builtin.tensorizer_uri, device="cpu", lazy_load=True) as t:
        assert t[MARKER_KEY].tolist() == [0]  # vLLM's marker: a meta tensor
    # vLLM's own serialize_vllm_model: meta marker, so post-processing must be asked for
    assert op_tokens(results, "load_cw_vllm_builtin") == op_tokens(results, "reference")
    # CoreWeave's writer with our pre-processing marker value: recognised on its own
    assert op_tokens(results, "load_cw_pre_marker") == op_tokens(results, "reference")


_COREWEAVE_DIGESTS = """
import hashlib, json, sys
import torch
from tensorizer import DecryptionParams, TensorDeserializer
key = open(sys.argv[2], "rb").read() if len(sys.argv) > 2 else None
enc = DecryptionParams.from_key(key) if key else None
with TensorDeserializer(sys.argv[1], device="cpu", encryption=enc, verify_hash=True) as d:
    out = {k: hashlib.sha256(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
           .hexdigest() for k, v in d.items()}
print("DIGESTS " + json.dumps(out))
"""


@pytest.mark.crosscheck
@pytest.mark.parametrize("kind", ["plain", "enc"])
def test_coreweave_reads_our_vllm_files(results, work, kind):
    """CoreWeave tensorizer 2.10.1 (the version vLLM pins) reads what tensorize_vllm_model wrote,
    hashes verified, with the same tensors as ours (marker value included)."""
    if kind == "enc" and not ENCRYPTION:
        pytest.skip("this build of tensorizer_rs cannot encrypt yet")
    path = work / kind / "model.tensors"
    key = [work / kind / "model.key"] if kind == "enc" else []
    proc = run_coreweave("2.10.1", _COREWEAVE_DIGESTS, path, *key)
    theirs = json.loads(proc.stdout.split("DIGESTS ", 1)[1])
    dec = DecryptionParams.from_key(key[0].read_bytes()) if key else None
    with TensorDeserializer(str(path), device="cpu", encryption=dec) as d:
        ours = {k: sha256(v) for k, v in d.items()}
    assert theirs == ours
    assert MARKER_KEY in ours


@needs_encryption
def test_encrypted_roundtrip(results, work):
    key = work / "enc" / "model.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) == 32
    assert op_tokens(results, "load_enc") == op_tokens(results, "reference")
    assert op_error(results, "err_enc_no_key")[0] == "CryptographyError"


@needs_encryption
def test_load_coreweave_encrypted_file(results):
    assert op_tokens(results, "load_cw_encrypted") == op_tokens(results, "reference")


# ----------------------------------------------------------------------------- error cases
@pytest.mark.parametrize("key", ["device", "dtype", "mode"])
def test_blacklisted_parameter_for_loading(results, key):
    assert op_error(results, f"err_{key}") == (
        "ValueError",
        f"{key} is not an allowed Tensorizer argument.",
    )


def test_sharded_uri_without_template(results):
    kind, msg = op_error(results, "tensorize_template_tp2")
    assert kind == "ValueError"
    assert msg == (
        "For a sharded model, tensorizer_uri should include a string format template like "
        "'%04d' to be formatted with the rank of the shard"
    )


def test_deserialization_kwargs_reach_tensor_deserializer(results):
    kind, msg = op_error(results, "err_num_readers")
    assert kind in ("TypeError", "TensorizerTypeError") and "bar" in msg, (kind, msg)


def test_stream_kwargs_reach_open_stream(results):
    kind, msg = op_error(results, "err_stream_mode")
    assert kind in ("ValueError", "TensorizerValueError") and "foo" in msg, (kind, msg)


def test_missing_file(results):
    kind, _ = op_error(results, "err_no_file")
    assert kind in ("FileNotFoundError", "TensorizerFileNotFoundError"), kind


@pytest.mark.parametrize("fmt", ["auto", "safetensors"])
def test_tensorizer_config_rejected_by_other_load_formats(results, fmt):
    kind, msg = op_error(results, f"err_{fmt}")
    assert kind == "ValueError"
    assert msg.startswith(f"Unexpected extra config keys for load format {fmt}"), msg


# ----------------------------------------------------------------------------- vllm serve
def test_vllm_serve(results, work):
    """`vllm serve DIR --load-format tensorizer` (front end, EngineCore and worker processes)
    answers a completion with the reference tokens."""
    want = op_tokens(results, "reference")[0]
    model = str(work / "plain")
    env = vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="1")
    args = [model, "--load-format", "tensorizer", *TINY_SERVE_ARGS]
    log_path = work / "serve.log"
    with vllm_serve(args, env=env, log_path=log_path) as url:
        answer = complete(url, model, [1, 10, 20, 30, 40])
    assert answer["choices"][0]["token_ids"] == want, answer
    log = log_path.read_text()
    assert "tensorizer_rs: deserialized" in log  # our loader did the load, in the worker
    assert "Registered model loader `<class 'tensorizer_rs.vllm.loader.TensorizerRsLoader'>`" in log


# ----------------------------------------------------------------------------- tensor parallel
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on CPU needs 2 cores")
def test_tensor_parallel_2(tiny_model, work):
    """TP=2 on CPU (one core per rank): each rank writes its own shard of the vLLM module
    (load_format tensorizer_rs_serialize, which also serves the checkpoint: the reference), and
    LLM(load_format="tensorizer") with the %03d template loads the shards back."""
    template = str(work / "tp2" / "model-rank-%03d.tensors")
    cfg = {"tensorizer_uri": template}
    if ENCRYPTION:
        from tensorizer_rs.vllm.serialize import write_keyfile

        cfg["encryption_keyfile"] = str(work / "tp2" / "model.key")
        write_keyfile(cfg["encryption_keyfile"], TensorizerConfig(**cfg))
    env = vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND="0|1")
    results = run_ops(
        [
            {
                "op": "generate",
                "name": "serialize",
                "model": str(tiny_model),
                "tp": 2,
                "load_format": "tensorizer_rs_serialize",
                "extra": {"tensorizer_config": cfg},
            },
            {
                "op": "generate",
                "name": "load",
                "model": str(tiny_model),
                "tp": 2,
                "load_format": "tensorizer",
                "extra": cfg,
            },
        ],
        env=env,
        timeout=900,
    )
    ref = op_tokens(results, "serialize")
    dec = None
    if ENCRYPTION:
        dec = DecryptionParams.from_key(Path(cfg["encryption_keyfile"]).read_bytes())
    for rank in (0, 1):
        shard = template % rank
        assert os.path.isfile(shard)
        with TensorDeserializer(shard, device="cpu", lazy_load=True, encryption=dec) as t:
            # each rank holds half of the fused QKV rows
            assert t["model.layers.0.self_attn.qkv_proj.weight"].shape[0] == (128 + 2 * 64) // 2
    assert op_tokens(results, "load") == ref


# ----------------------------------------------------------------------------- example script
def test_example_script(tiny_model, work):
    script = REPO / "examples" / "tensorize_vllm_model.py"
    engine = [
        "--model",
        str(tiny_model),
        "--dtype",
        "bfloat16",
        "--enforce-eager",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "4",
    ]
    out = run_script(
        [
            script,
            *engine,
            "serialize",
            "--serialized-directory",
            work / "example",
            "--suffix",
            "test",
            "--serialization-kwargs",
            '{"limit_cpu_concurrency": 1}',
        ]
    )
    assert "Successfully serialized" in out.stdout + out.stderr
    # vLLM's layout: {dir}/vllm/{--model}/{suffix}/model.tensors
    tensors = Path(f"{work}/example/vllm/{tiny_model}/test/model.tensors")
    assert tensors.is_file()
    out = run_script(
        [script, *engine, "deserialize", "--path-to-tensors", tensors, "--num-readers", "2"]
    )
    assert "tensorizer_rs: deserialized" in out.stdout + out.stderr
