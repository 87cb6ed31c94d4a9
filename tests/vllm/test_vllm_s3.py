"""vLLM model dirs in object storage, against a real S3 server (moto, SigV4-checked, 127.0.0.1).

As in vLLM's tensorizer docs: `tensorize_vllm_model` writes `model.tensors` plus the model's
config and tokenizer files to `s3://bucket/vllm/<org>/<model>/v1/`, and
`LLM("s3://bucket/vllm/<org>/<model>/v1", load_format="tensorizer")` /
`vllm serve s3://... --load-format tensorizer` read all of it from there, with the credentials
vLLM users set (`S3_ACCESS_KEY_ID`, `S3_SECRET_ACCESS_KEY`, `S3_ENDPOINT_URL`). vLLM fetches the
config and tokenizer of s3:// models through runai-model-streamer, which is not installed here:
the plugin supplies that fetch (tensorizer_rs.vllm.objstore).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorizer_rs import TensorDeserializer
from tensorizer_rs.stream_io import open_stream
from tensorizer_rs.vllm import MARKER_KEY, PRE_PROCESSING_MARKER
from vllm_helpers import (
    TINY_SERVE_ARGS,
    complete,
    make_tiny_model,
    op_error,
    op_tokens,
    run_ops,
    vllm_env,
    vllm_serve,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BUCKET = "bucket"
PREFIX = "vllm/tiny-org/tiny-llama"
MODEL_DIR = f"s3://{BUCKET}/{PREFIX}/v1"
ENC_DIR = f"s3://{BUCKET}/{PREFIX}/v1-encrypted"
KEYFILE = f"s3://{BUCKET}/keys/tiny-llama.key"
WRONG_SECRET = "not-the-secret-key"


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.bucket(BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-s3")


@pytest.fixture(scope="module")
def tiny_model(work) -> Path:
    return make_tiny_model(work / "tiny-llama")


def _env(s3, work) -> dict:
    # VLLM_ASSETS_CACHE: where vLLM mirrors the config/tokenizer of s3:// models.
    return vllm_env(**s3.env, VLLM_ASSETS_CACHE=str(work / "vllm-assets"))


@pytest.fixture(scope="module")
def results(tiny_model, work, s3) -> dict:
    def load(name, model, **extra):
        return {"op": "generate", "name": name, "model": model, "load_format": "tensorizer",
                "extra": extra}  # fmt: skip

    ops = [
        {"op": "generate", "name": "reference", "model": str(tiny_model)},
        {
            "op": "tensorize",
            "name": "tensorize",
            "model": str(tiny_model),
            "config": {"tensorizer_dir": MODEL_DIR},
        },
        {
            "op": "tensorize",
            "name": "tensorize_enc",
            "model": str(tiny_model),
            "config": {"tensorizer_dir": ENC_DIR, "encryption_keyfile": KEYFILE},
        },
        load("load", MODEL_DIR),
        load("load_enc", ENC_DIR, encryption_keyfile=KEYFILE),
        load("err_enc_no_key", ENC_DIR),
        # From here on the environment holds a wrong secret.
        {"op": "env", "values": {"S3_SECRET_ACCESS_KEY": WRONG_SECRET}},
        load("err_wrong_credentials", MODEL_DIR),
        # Credentials in the extra config (the weights') serve config and tokenizer too.
        load(
            "load_extra_credentials",
            MODEL_DIR,
            s3_access_key_id=s3.access_key,
            s3_secret_access_key=s3.secret_key,
            s3_endpoint=s3.endpoint,
        ),
    ]
    return run_ops(ops, env=_env(s3, work))


def _listing(s3, prefix: str) -> dict[str, int]:
    out = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :]: o["Size"] for o in out.get("Contents", [])}


def test_tensorize_vllm_model_to_s3(results, s3):
    """model.tensors, config and tokenizer files land in the S3 model dir (weights excluded)."""
    for name in ("tensorize", "tensorize_enc"):
        assert "error" not in results[name], results[name]
    for prefix in (f"{PREFIX}/v1", f"{PREFIX}/v1-encrypted"):
        names = _listing(s3, prefix)
        assert {"model.tensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
            names
        ), names
        assert not any(n.endswith(".safetensors") for n in names), names
    assert _listing(s3, "keys") == {"tiny-llama.key": 32}
    with TensorDeserializer(
        open_stream(f"{MODEL_DIR}/model.tensors", **s3.opts), device="cpu", lazy_load=True
    ) as t:
        assert t[MARKER_KEY].tolist() == [PRE_PROCESSING_MARKER]
        assert t["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.bfloat16


def test_llm_from_s3_model_dir(results):
    """LLM("s3://bucket/vllm/org/model/v1", load_format="tensorizer"): config, tokenizer and
    weights all come from S3, with S3_* credentials from the environment."""
    assert op_tokens(results, "load") == op_tokens(results, "reference")
    # the tokenizer (from S3) decodes like the reference's
    assert results["load"]["text"] == results["reference"]["text"]
    out = results["load"]["out"]
    fetched = next(line for line in out.splitlines() if "tensorizer_rs: fetched" in line)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert name in fetched, fetched
    assert f"from {MODEL_DIR}/model.tensors" in out


def test_llm_from_s3_encrypted_with_s3_keyfile(results):
    assert op_tokens(results, "load_enc") == op_tokens(results, "reference")
    assert results["load_enc"]["text"] == results["reference"]["text"]
    assert op_error(results, "err_enc_no_key")[0] == "CryptographyError"


def test_wrong_credentials_fail_fast_and_clearly(results, s3):
    kind, msg = op_error(results, "err_wrong_credentials")
    assert "access denied" in msg and f"{MODEL_DIR}/config.json" in msg, (kind, msg)
    assert WRONG_SECRET not in msg and s3.secret_key not in msg
    assert results["err_wrong_credentials"]["seconds"] < 60


def test_extra_config_credentials_also_fetch_config(results):
    """Credentials given in --model-loader-extra-config (wrong ones in the environment) serve
    the config/tokenizer fetch as well as the weights."""
    assert op_tokens(results, "load_extra_credentials") == op_tokens(results, "reference")


def test_vllm_serve_s3_model_dir(results, work, s3):
    """`vllm serve s3://bucket/vllm/org/model/v1 --load-format tensorizer` (front end,
    EngineCore and worker processes) answers a completion with the reference tokens."""
    want = op_tokens(results, "reference")[0]
    op_tokens(results, "load")  # the model dir is in place
    log_path = work / "serve.log"
    env = dict(_env(s3, work), VLLM_ENABLE_V1_MULTIPROCESSING="1")
    args = [MODEL_DIR, "--load-format", "tensorizer", *TINY_SERVE_ARGS]
    with vllm_serve(args, env=env, log_path=log_path) as url:
        answer = complete(url, MODEL_DIR, [1, 10, 20, 30, 40])
    assert answer["choices"][0]["token_ids"] == want, answer
    log = log_path.read_text()
    assert "tensorizer_rs: fetched config.json" in log
    assert f"from {MODEL_DIR}/model.tensors" in log  # our loader read the weights from S3
