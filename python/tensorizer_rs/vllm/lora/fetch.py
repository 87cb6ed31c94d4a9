"""Adapter dirs that vLLM can open locally: a cache dir standing for a remote adapter
(`fetch_adapter`, what the hooked `get_adapter_absolute_path` returns), one for an adapter
described by a TensorizerConfig (`prepare_lora_dir`), and the `LoRARequest` built on it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

from ..config import logger, stream_kwargs_of
from .settings import (
    _LOCATION_FIELDS,
    _SECRET_FIELDS,
    ADAPTER_CONFIG,
    ADAPTER_TENSORS,
    SIDECAR,
    STANDARD_WEIGHTS,
    _as_config,
    _env_stream_kwargs,
    cache_root,
    is_remote,
)


def _cache_dir(key: str, label: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = label.rstrip("/").rsplit("/", 1)[-1][-40:]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
    path = os.path.join(cache_root(), f"{name or 'adapter'}-{digest}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _write_atomic(path: str, data: bytes | None = None, src=None) -> None:
    """Write `data` (or copy the file object `src`) to `path` via a private temp name, so that
    concurrent fetches (one per tensor-parallel rank) never see a partial file."""
    tmp = f"{path}.{os.getpid()}.part"
    with open(tmp, "wb") as out:
        if src is not None:
            shutil.copyfileobj(src, out, 16 << 20)
        else:
            out.write(data)
    os.replace(tmp, path)


def _remove(dir_: str, names) -> None:
    for n in names:
        p = os.path.join(dir_, n)
        if os.path.lexists(p):
            os.remove(p)


def _open_remote(uri: str, stream_kwargs: dict):
    from tensorizer_rs.stream_io import open_stream

    return open_stream(uri, mode="rb", **stream_kwargs)


def fetch_adapter(uri: str, stream_kwargs: dict | None = None) -> str:
    """A local dir standing for the remote adapter dir `uri` (`s3://`, `http(s)://`).

    `adapter_config.json` is copied into a cache dir (`TENSORIZER_RS_LORA_CACHE`, default
    `~/.cache/tensorizer_rs/lora/`); for `adapter_model.tensors` only a sidecar naming the remote
    object is written, and the hook reads it from there (parallel ranged reads, decrypted in
    memory), so neither the tensors nor a decrypted copy land on disk. A remote dir with
    `adapter_model.safetensors` instead is copied, for vLLM's own loader. Everything is fetched
    again on each call (vLLM calls it once per adapter load).

    `stream_kwargs` default to the S3 settings of `TENSORIZER_RS_LORA_CONFIG` (and then
    `open_stream`'s own: `S3_ACCESS_KEY_ID`, ..., AWS config).
    """
    base = uri.rstrip("/")
    if stream_kwargs is None:
        stream_kwargs = _env_stream_kwargs()
    local = _cache_dir(base, base)
    with _open_remote(f"{base}/{ADAPTER_CONFIG}", stream_kwargs) as f:
        config = f.read()
    json.loads(config)  # fail here, naming the URI, rather than in vLLM's PEFTHelper
    tensors_uri = f"{base}/{ADAPTER_TENSORS}"
    try:
        _open_remote(tensors_uri, stream_kwargs).close()
        found = ADAPTER_TENSORS
    except FileNotFoundError:
        found = None
    if found is None:
        st = f"{base}/adapter_model.safetensors"
        try:
            with _open_remote(st, stream_kwargs) as src:
                _write_atomic(os.path.join(local, "adapter_model.safetensors"), src=src)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{base} has no {ADAPTER_TENSORS} and no adapter_model.safetensors"
            ) from e
        _remove(local, (SIDECAR, "adapter_model.bin", "adapter_model.pt"))
    else:
        _remove(local, STANDARD_WEIGHTS)
        _write_atomic(
            os.path.join(local, SIDECAR), json.dumps({"tensorizer_uri": tensors_uri}).encode()
        )
    _write_atomic(os.path.join(local, ADAPTER_CONFIG), config)
    logger.info("tensorizer_rs: LoRA adapter %s -> %s", base, local)
    return local


def prepare_lora_dir(tensorizer_config: Any) -> str:
    """A local adapter dir that loads the adapter in `tensorizer_config.tensorizer_dir` (or the
    <= 0.31 `lora_dir`) with that config's read settings, for `LoRARequest(lora_path=...)` or
    `vllm serve --lora-modules NAME=<dir>`.

    The dir (under the LoRA cache) holds a copy of `adapter_config.json` and an
    `adapter_tensorizer_config.json` with the config's fields minus S3 credentials. A remote
    adapter is fetched here, with the config's S3 settings, into that dir; the key file is read
    where the adapter is loaded (a remote key file there with the environment's credentials).
    """
    cfg, lora_dir = _as_config(tensorizer_config)
    src_dir = (lora_dir or cfg.tensorizer_dir).rstrip("/")
    stream_kwargs = {k: v for k, v in stream_kwargs_of(cfg).items() if v is not None}
    sidecar = {
        k: v
        for k, v in cfg.to_serializable().items()
        if k not in _LOCATION_FIELDS | _SECRET_FIELDS and k != "serialization_kwargs"
    }
    if sidecar.get("stream_kwargs"):
        sidecar["stream_kwargs"] = {
            k: v for k, v in sidecar["stream_kwargs"].items() if k not in _SECRET_FIELDS
        }
    for k in ("stream_kwargs", "deserialization_kwargs"):
        if not sidecar.get(k):
            sidecar.pop(k, None)
    if cfg.encryption_keyfile and not is_remote(cfg.encryption_keyfile):
        sidecar["encryption_keyfile"] = os.path.abspath(cfg.encryption_keyfile)
    local = _cache_dir(json.dumps([src_dir, sidecar], sort_keys=True), src_dir)
    tensors = f"{src_dir}/{ADAPTER_TENSORS}"
    if is_remote(src_dir):
        with _open_remote(f"{src_dir}/{ADAPTER_CONFIG}", stream_kwargs) as f:
            config = f.read()
        with _open_remote(tensors, stream_kwargs) as f:
            _write_atomic(os.path.join(local, ADAPTER_TENSORS), src=f)
        sidecar["tensorizer_uri"] = ADAPTER_TENSORS
    else:
        with open(os.path.join(src_dir, ADAPTER_CONFIG), "rb") as f:
            config = f.read()
        if not os.path.isfile(tensors):
            raise FileNotFoundError(f"{tensors} does not exist")
        sidecar["tensorizer_uri"] = os.path.abspath(tensors)
    _remove(local, STANDARD_WEIGHTS)
    _write_atomic(os.path.join(local, SIDECAR), json.dumps(sidecar, indent=1).encode())
    _write_atomic(os.path.join(local, ADAPTER_CONFIG), config)
    return local


def lora_request_from_tensorizer_config(
    lora_name: str, lora_int_id: int, tensorizer_config: Any, **lora_request_kwargs
):
    """`LoRARequest` for a tensorized adapter described the vLLM <= 0.31 way, i.e. what
    `LoRARequest(name, id, path, tensorizer_config_dict=cfg.to_serializable())` meant then: the
    adapter is in `tensorizer_dir` (or `lora_dir`), read with the config's settings. Accepts a
    dict, our `TensorizerConfig` or vLLM's. See `prepare_lora_dir`."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(
        lora_name=lora_name,
        lora_int_id=lora_int_id,
        lora_path=prepare_lora_dir(tensorizer_config),
        **lora_request_kwargs,
    )
