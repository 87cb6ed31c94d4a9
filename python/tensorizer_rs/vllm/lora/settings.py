"""Where a LoRA adapter is and how to read it: the file names, the process-wide settings
(`TENSORIZER_RS_LORA_CONFIG`, `TENSORIZER_RS_LORA_CACHE`, `TENSORIZER_RS_LORA_RESOLVER_DIR`:
this module reads them, nothing else in the plugin does) and each adapter dir's sidecar."""

from __future__ import annotations

import json
import os
from typing import Any

from ..config import INIT_FIELDS, TensorizerConfig, logger, stream_kwargs_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_TENSORS = "adapter_model.tensors"
#: Per-adapter read settings (TensorizerConfig fields as JSON), next to adapter_config.json.
SIDECAR = "adapter_tensorizer_config.json"
#: Weight files vLLM's own `from_local_checkpoint` reads; when one is present it is used.
STANDARD_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
CONFIG_ENV = "TENSORIZER_RS_LORA_CONFIG"
CACHE_ENV = "TENSORIZER_RS_LORA_CACHE"
RESOLVER_ENV = "TENSORIZER_RS_LORA_RESOLVER_DIR"

#: Fields that say where the tensors are; they are per adapter, never defaults for all.
_LOCATION_FIELDS = frozenset({"tensorizer_uri", "tensorizer_dir"})
#: Fields never written to a sidecar file: credentials stay in the caller's process and env.
_SECRET_FIELDS = frozenset({"s3_access_key_id", "s3_secret_access_key"})


def is_remote(path: str) -> bool:
    """Whether `path` is an `s3://` / `http(s)://` URI (the storage layer decides)."""
    from tensorizer_rs import _native

    return isinstance(path, str) and _native.is_remote(path)


def _as_config(tensorizer_config: Any) -> tuple[TensorizerConfig, str | None]:
    """Our TensorizerConfig from ours, vLLM's, or a (<= 0.31 `to_serializable()`) dict, and the
    <= 0.31 `lora_dir` if one was set."""
    if isinstance(tensorizer_config, TensorizerConfig):
        return tensorizer_config, getattr(tensorizer_config, "lora_dir", None)
    if hasattr(tensorizer_config, "to_serializable"):
        lora_dir = getattr(tensorizer_config, "lora_dir", None)
        tensorizer_config = tensorizer_config.to_serializable()
    else:
        tensorizer_config = dict(tensorizer_config)
        lora_dir = tensorizer_config.get("lora_dir")
    unknown = set(tensorizer_config) - INIT_FIELDS - {"lora_dir"}
    if unknown:
        logger.warning("Ignoring tensorizer_config keys this loader does not know: %s", unknown)
    known = {k: v for k, v in tensorizer_config.items() if k in INIT_FIELDS}
    if lora_dir and not known.get("tensorizer_uri") and not known.get("tensorizer_dir"):
        known["tensorizer_dir"] = lora_dir
    return TensorizerConfig(**known), lora_dir


def _check_fields(settings: dict, where: str, allow_location: bool) -> dict:
    if not isinstance(settings, dict):
        raise TypeError(f"{where} must hold a JSON object of TensorizerConfig fields")
    allowed = INIT_FIELDS if allow_location else INIT_FIELDS - _LOCATION_FIELDS
    unknown = set(settings) - allowed
    if unknown:
        raise ValueError(
            f"{where}: unknown or misplaced keys {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    return settings


def env_settings() -> dict:
    """The settings for every adapter of this process: `TENSORIZER_RS_LORA_CONFIG`, a JSON
    object of TensorizerConfig fields or the path of a file holding one (`{}` when unset)."""
    raw = os.environ.get(CONFIG_ENV, "").strip()
    if not raw:
        return {}
    try:
        if raw.startswith("{"):
            settings = json.loads(raw)
        else:
            with open(raw) as f:
                settings = json.load(f)
    except ValueError as e:
        raise ValueError(f"{CONFIG_ENV} is neither a JSON object nor a JSON file: {e}") from e
    return _check_fields(settings, CONFIG_ENV, allow_location=False)


def _sidecar_settings(lora_dir: str) -> dict:
    path = os.path.join(lora_dir, SIDECAR)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        settings = _check_fields(json.load(f), path, allow_location=True)
    uri = settings.get("tensorizer_uri")
    if uri and not is_remote(uri) and not os.path.isabs(uri):
        settings["tensorizer_uri"] = os.path.join(lora_dir, uri)
    return settings


def adapter_read_config(lora_dir: str) -> TensorizerConfig:
    """How to read the adapter in the local dir `lora_dir`: `TENSORIZER_RS_LORA_CONFIG`, then the
    dir's `adapter_tensorizer_config.json` (field by field); the tensors are
    `{lora_dir}/adapter_model.tensors` unless the sidecar names a `tensorizer_uri`."""
    settings = {**env_settings(), **_sidecar_settings(lora_dir)}
    settings.pop("tensorizer_dir", None)
    settings.setdefault("tensorizer_uri", os.path.join(lora_dir, ADAPTER_TENSORS))
    return TensorizerConfig(**settings)


def is_tensorized_adapter_dir(lora_dir: str) -> bool:
    """A local dir that vLLM's own loader cannot read but we can: it has `adapter_model.tensors`
    or a sidecar, and none of vLLM's standard weight files (those win when present)."""
    if not isinstance(lora_dir, str) or not os.path.isdir(lora_dir):
        return False
    if any(os.path.isfile(os.path.join(lora_dir, n)) for n in STANDARD_WEIGHTS):
        return False
    return os.path.isfile(os.path.join(lora_dir, ADAPTER_TENSORS)) or os.path.isfile(
        os.path.join(lora_dir, SIDECAR)
    )


def cache_root() -> str:
    root = os.environ.get(CACHE_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "tensorizer_rs", "lora")
    return root


def _env_stream_kwargs() -> dict:
    settings = env_settings()
    cfg = TensorizerConfig(tensorizer_dir="unused", **settings)
    return {k: v for k, v in stream_kwargs_of(cfg).items() if v is not None}


def resolver_base() -> str | None:
    """`TENSORIZER_RS_LORA_RESOLVER_DIR`: where the resolver looks for adapters (unset: no
    resolver)."""
    return os.environ.get(RESOLVER_ENV) or None
