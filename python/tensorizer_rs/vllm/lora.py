"""LoRA adapters stored with tensorizer_rs and served by vLLM.

vLLM 0.32 removed its tensorizer LoRA support (`tensorize_lora_adapter`,
`LoRARequest.tensorizer_config_dict`). This module brings it back, for every place vLLM takes an
adapter (`LLM.generate(lora_request=...)`, `vllm serve --lora-modules`, `/v1/load_lora_adapter`,
LoRA resolvers):

* `tensorize_lora_adapter(lora_path, tensorizer_config)` writes a PEFT adapter as
  `adapter_config.json` (plain JSON, vLLM reads it itself) + `adapter_model.tensors` into
  `tensorizer_config.tensorizer_dir` (local or `s3://`), encrypted when the config has a key file.
* `install()` (called by the plugin in every vLLM process) wraps two vLLM internals, each only if
  its signature is the one tested here (otherwise it logs a warning and leaves vLLM alone):
  `LoRAModel.from_local_checkpoint`, so that a dir with `adapter_model.tensors` (and no standard
  weights file) is read by `TensorDeserializer` (parallel reads, decryption in memory) and handed
  to `LoRAModel.from_lora_tensors`; and the worker's `get_adapter_absolute_path`, so that an
  `s3://` / `http(s)://` adapter dir is fetched: `adapter_config.json` into a local cache dir,
  the tensors read straight from the remote object (see `fetch_adapter`).
* How an adapter is read (key file, `num_readers`, `verify_hash`, S3 settings): the JSON object in
  the env var `TENSORIZER_RS_LORA_CONFIG` (for all adapters of the process), overridden field by
  field by an `adapter_tensorizer_config.json` in the adapter dir (per adapter; written by
  `prepare_lora_dir` and `lora_request_from_tensorizer_config`). A key is used only for encrypted
  files, so one key setting can serve encrypted and plain adapters alike.
* `lora_request_from_tensorizer_config(name, id, tensorizer_config_dict)` builds a `LoRARequest`
  from a vLLM <= 0.31-style config dict.
* `TensorizerLoRAResolver`: with `TENSORIZER_RS_LORA_RESOLVER_DIR=<local dir | s3:// | https://>`
  and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`, a request for an unknown model name `NAME` loads the
  adapter at `<dir>/NAME`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import os
import shutil
import time
from typing import Any

from .config import (
    INIT_FIELDS,
    TensorizerConfig,
    logger,
    read_bytes,
    stream_kwargs_of,
)

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
_REMOTE_SCHEMES = ("s3://", "http://", "https://")


def is_remote(path: str) -> bool:
    return isinstance(path, str) and path.lower().startswith(_REMOTE_SCHEMES)


# ----------------------------------------------------------------------------- configs
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


# ----------------------------------------------------------------------------- reading
def _is_encrypted(source: Any) -> bool:
    """Whether the .tensors file behind a URI or `open_stream` object is encrypted (header only)."""
    from tensorizer_rs import _native

    if isinstance(source, str):
        f = _native.TensorFile(source)
    else:
        uri = getattr(source, "_tensorizer_uri", None) or getattr(source, "name", None)
        f = _native.TensorFile(uri, getattr(source, "_tensorizer_storage", None))
    try:
        return bool(f.encrypted)
    finally:
        f.close()


def load_adapter_tensors(lora_dir: str, filter_func=None) -> dict:
    """The adapter's tensors (CPU, plain tensors) read with `TensorDeserializer`.

    Errors keep their class and name the file, the adapter dir and the key file, e.g.
    `CryptographyError: tensorizer_rs: cannot read the LoRA adapter file adapter_model.tensors
    of DIR (DIR/adapter_model.tensors, key file KEY): ... wrong key or corrupted data`.
    """
    from tensorizer_rs import DecryptionParams, TensorDeserializer
    from tensorizer_rs.exceptions import CryptographyError, TensorizerError

    cfg = adapter_read_config(lora_dir)
    uri = cfg.tensorizer_uri
    keyfile = cfg.encryption_keyfile
    try:
        plain = TensorizerConfig(**{**cfg.to_serializable(), "encryption_keyfile": None})
        args = plain._construct_tensorizer_args()
        # A local path is opened by the reader itself; a remote one through open_stream when
        # the config has stream settings (credentials, endpoint).
        source = args.source(uri) if is_remote(uri) else uri
        try:
            kwargs = dict(args.deserialization_kwargs)
            if _is_encrypted(source):
                if not keyfile:
                    raise CryptographyError(
                        f"{uri} is encrypted, but no key file is set for LoRA adapters (set "
                        f"encryption_keyfile in {CONFIG_ENV} or in {SIDECAR} next to the adapter)"
                    )
                try:
                    key = read_bytes(keyfile, args.stream_kwargs)
                except OSError as e:  # not a FileNotFoundError: vLLM would say "no adapter"
                    raise CryptographyError(f"cannot read the key file: {e}") from e
                kwargs["encryption"] = DecryptionParams.from_key(key)
            start = time.perf_counter()
            with TensorDeserializer(source, device="cpu", filter_func=filter_func, **kwargs) as d:
                # Plain tensors: the reader returns Parameters (requires_grad for floats).
                tensors = {k: v.detach() for k, v in d.items()}
                nbytes = d.total_tensor_bytes
        finally:
            if not isinstance(source, str):
                source.close()
    except TensorizerError as e:
        # The file's base name survives vLLM's scrubbing of paths from HTTP error messages;
        # the full paths are in the server log.
        what = f", key file {keyfile}" if keyfile and isinstance(e, CryptographyError) else ""
        msg = (
            f"tensorizer_rs: cannot read the LoRA adapter file {os.path.basename(uri)} of "
            f"{lora_dir} ({uri}{what}): {e}"
        )
        try:
            err = type(e)(msg)
        except Exception:  # noqa: BLE001 - a class with another constructor: keep the text
            err = TensorizerError(msg)
        raise err from e
    logger.info(
        "tensorizer_rs: loaded LoRA adapter %s: %d tensors, %d bytes from %s in %.2f s%s",
        lora_dir,
        len(tensors),
        nbytes,
        uri,
        time.perf_counter() - start,
        " (decrypted)" if "encryption" in kwargs and kwargs["encryption"] is not None else "",
    )
    return tensors


# ----------------------------------------------------------------------------- local cache
def cache_root() -> str:
    root = os.environ.get(CACHE_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "tensorizer_rs", "lora")
    return root


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


def _env_stream_kwargs() -> dict:
    settings = env_settings()
    cfg = TensorizerConfig(tensorizer_dir="unused", **settings)
    return {k: v for k, v in stream_kwargs_of(cfg).items() if v is not None}


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


# ----------------------------------------------------------------------------- serializing
def _local_adapter_source(lora_path: str) -> str:
    """A local dir with the adapter: `lora_path` itself, or a hub id's snapshot (fetched with
    huggingface_hub, which uses only its cache when HF_HUB_OFFLINE=1)."""
    expanded = os.path.expanduser(lora_path)
    if os.path.isdir(expanded):
        return expanded
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id=lora_path, allow_patterns=[ADAPTER_CONFIG, "adapter_model.*"]
        )
    except Exception as e:  # one message for "no such dir", "no such hub repo", offline
        raise ValueError(
            f"{lora_path} is neither a local directory nor a Hugging Face hub adapter that "
            f"could be fetched or found in the local cache: {e}"
        ) from e


def tensorize_lora_adapter(lora_path: str, tensorizer_config: Any) -> None:
    """Write the PEFT adapter at `lora_path` (a local dir, or a hub id; with `adapter_config.json`
    and `adapter_model.safetensors` or `.bin`) as `adapter_config.json` (copied as is) and
    `adapter_model.tensors` into `tensorizer_config.tensorizer_dir` (or the <= 0.31 attribute
    `lora_dir` when set), local or `s3://`, as vLLM <= 0.31's function did. With
    `encryption_keyfile` set (an existing key, e.g. the model's) the tensors are encrypted
    with it; `serialization_kwargs` go to `TensorSerializer`."""
    from tensorizer_rs import EncryptionParams, TensorSerializer
    from tensorizer_rs._progress import bytes_callback, terminal_bar
    from tensorizer_rs.stream_io import open_stream

    cfg, lora_dir = _as_config(tensorizer_config)
    out_dir = (lora_dir or cfg.tensorizer_dir).rstrip("/")
    src = _local_adapter_source(lora_path)
    config_path = os.path.join(src, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise ValueError(f"{src} has no {ADAPTER_CONFIG}")
    weights = [n for n in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = [os.path.join(src, n) for n in weights if os.path.isfile(os.path.join(src, n))]
    if not weights:
        raise ValueError(
            f"{src} has neither adapter_model.safetensors nor adapter_model.bin; "
            "only those formats are supported"
        )
    if weights[0].endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(weights[0], device="cpu")
    else:
        import torch

        tensors = torch.load(weights[0], map_location="cpu", weights_only=True)

    stream_kwargs = stream_kwargs_of(cfg)
    write_kwargs = {**stream_kwargs, "mode": "wb+"}
    with (
        open(config_path, "rb") as f,
        open_stream(f"{out_dir}/{ADAPTER_CONFIG}", **write_kwargs) as o,
    ):
        o.write(f.read())
    encryption = None
    if cfg.encryption_keyfile:
        encryption = EncryptionParams(key=read_bytes(cfg.encryption_keyfile, stream_kwargs))
    dest: Any = f"{out_dir}/{ADAPTER_TENSORS}"
    if any(v is not None for v in stream_kwargs.values()):
        dest = open_stream(dest, **write_kwargs)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with terminal_bar(total, f"Serializing {ADAPTER_TENSORS}") as bar:
        serializer = TensorSerializer(
            dest, encryption=encryption, progress=bytes_callback(bar), **cfg.serialization_kwargs
        )
        serializer.write_state_dict(tensors)
        serializer.close()
    logger.info(
        "Successfully serialized LoRA adapter %s to %s/%s%s",
        lora_path,
        out_dir,
        ADAPTER_TENSORS,
        " (encrypted)" if encryption is not None else "",
    )


# ----------------------------------------------------------------------------- resolver
def _make_resolver_class():
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class TensorizerLoRAResolver(LoRAResolver):
        """Resolves a model name `NAME` to the adapter dir `<base>/NAME` (local, `s3://`,
        `http(s)://`) when its `adapter_config.json` exists. The adapter may be tensorized or a
        plain PEFT dir; the worker-side hooks fetch and read it."""

        def __init__(self, base: str):
            self.base = base.rstrip("/")

        def _exists(self, path: str) -> bool:
            if not is_remote(path):
                return os.path.isfile(path)
            try:
                _open_remote(path, _env_stream_kwargs()).close()
            except OSError:
                return False
            return True

        async def resolve_lora(self, base_model_name: str, lora_name: str):
            parts = lora_name.split("/")
            if not lora_name or "://" in lora_name or lora_name.startswith("/") or ".." in parts:
                return None
            path = f"{self.base}/{lora_name}"
            if not await asyncio.to_thread(self._exists, f"{path}/{ADAPTER_CONFIG}"):
                return None
            return LoRARequest(
                lora_name=lora_name, lora_int_id=abs(hash(lora_name)) or 1, lora_path=path
            )

    return TensorizerLoRAResolver


def __getattr__(name):  # the resolver class needs vLLM; build it on first use
    if name == "TensorizerLoRAResolver":
        cls = _make_resolver_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


# ----------------------------------------------------------------------------- vLLM hooks
#: Parameter names of the vLLM functions we wrap or call, as tested (vLLM 0.32). A vLLM whose
#: functions differ gets a warning and no hook (see also OPTIONAL_TRAILING).
TESTED_SIGNATURES = {
    "LoRAModel.from_local_checkpoint": (
        "lora_dir",
        "expected_lora_modules",
        "peft_helper",
        "lora_model_id",
        "device",
        "dtype",
        "model_vocab_size",
        "weights_mapper",
        "skip_prefixes",
        "moe_ep_spec",
    ),
    "LoRAModel.from_lora_tensors": (
        "lora_model_id",
        "tensors",
        "peft_helper",
        "device",
        "dtype",
        "model_vocab_size",
        "weights_mapper",
        "skip_prefixes",
    ),
    "worker_manager.get_adapter_absolute_path": ("lora_path",),
    "utils.parse_fine_tuned_lora_name": ("name", "weights_mapper"),
}
#: Parameters a later vLLM appends to a tested signature, which our hook also handles
#: (vLLM 0.34: `unsupported_lora_modules`, model layers on which LoRA weights are unexpected).
OPTIONAL_TRAILING = {"LoRAModel.from_local_checkpoint": ("unsupported_lora_modules",)}


def _params(fn) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _mismatch(what: str, fn) -> str | None:
    """None if `fn` has the tested parameters, else a description of the difference."""
    want = TESTED_SIGNATURES[what]
    if fn is None:
        return f"{what} does not exist"
    got = _params(fn)
    if got != want and got != want + OPTIONAL_TRAILING.get(what, ()):
        return f"{what} has parameters {got}, not the tested {want}"
    return None


def _warn_not_installed(problem: str, consequence: str) -> None:
    logger.warning(
        "tensorizer_rs: not hooking vLLM's LoRA loading: %s. %s; vLLM's own behaviour is "
        "unchanged.",
        problem,
        consequence,
    )


def install() -> bool:
    """Install the hooks and, if `TENSORIZER_RS_LORA_RESOLVER_DIR` is set, the resolver.
    Returns True if anything was installed."""
    try:
        from vllm.lora import lora_model, utils, worker_manager  # noqa: F401
    except ImportError as e:
        logger.debug("tensorizer_rs: no vllm.lora (%s); LoRA hooks not installed", e)
        return False
    done = _patch_from_local_checkpoint()
    done = _patch_adapter_path() or done
    return _register_resolver() or done


def _patch_from_local_checkpoint() -> bool:
    from vllm.lora import lora_model, utils

    cls = getattr(lora_model, "LoRAModel", None)
    current = getattr(cls, "from_local_checkpoint", None)
    if getattr(current, "_tensorizer_rs", False):
        return False
    consequence = f"Adapter dirs with only {ADAPTER_TENSORS} will not load"
    for what, fn in (
        ("LoRAModel.from_local_checkpoint", current),
        ("LoRAModel.from_lora_tensors", getattr(cls, "from_lora_tensors", None)),
        ("utils.parse_fine_tuned_lora_name", getattr(utils, "parse_fine_tuned_lora_name", None)),
    ):
        problem = _mismatch(what, fn)
        if problem:
            _warn_not_installed(problem, consequence)
            return False
    helpers = {
        "LoRAModel._should_skip_module": getattr(cls, "_should_skip_module", None),
        "utils.is_base_embedding_weights": getattr(utils, "is_base_embedding_weights", None),
        "utils.get_lora_id": getattr(utils, "get_lora_id", None),
        "lora_model._is_remote_expert_key": getattr(lora_model, "_is_remote_expert_key", None),
    }
    missing = [k for k, v in helpers.items() if v is None]
    raw = cls.__dict__.get("from_local_checkpoint")
    if missing or not isinstance(raw, classmethod):
        _warn_not_installed(
            f"vLLM lacks {missing}" if missing else "from_local_checkpoint is not a classmethod",
            consequence,
        )
        return False
    original = raw.__func__

    @functools.wraps(original)
    def from_local_checkpoint(klass, lora_dir, expected_lora_modules, peft_helper, **kwargs):
        if not is_tensorized_adapter_dir(lora_dir):
            return original(klass, lora_dir, expected_lora_modules, peft_helper, **kwargs)
        return _from_tensorized_dir(klass, lora_dir, expected_lora_modules, peft_helper, **kwargs)

    from_local_checkpoint._tensorizer_rs = True
    from_local_checkpoint._original = raw
    cls.from_local_checkpoint = classmethod(from_local_checkpoint)
    return True


def _unexpected_modules(
    cls, names, expected, peft_helper, weights_mapper, skip_prefixes, unsupported=None
):
    """vLLM 0.32's `check_unexpected_modules` (a closure inside from_local_checkpoint), with
    vLLM 0.34's `unsupported_lora_modules` check."""
    from vllm.lora.utils import is_base_embedding_weights, parse_fine_tuned_lora_name

    unexpected = []
    for name in names:
        if is_base_embedding_weights(name) or "base_layer" in name:
            continue
        if skip_prefixes and cls._should_skip_module(name, skip_prefixes):
            continue
        module_name, _ = parse_fine_tuned_lora_name(name, weights_mapper)
        base_name = module_name.rsplit(".", 1)[-1]
        if ".experts" in module_name:
            suffix = module_name[module_name.find(".experts") + 1 :]
            if suffix not in expected:
                unexpected.append(module_name)
        elif base_name not in expected and base_name not in (peft_helper.modules_to_save or ()):
            unexpected.append(module_name)
        elif module_name in (unsupported or ()):
            unexpected.append(f"{module_name} (not a LoRA layer)")
    return unexpected


def _from_tensorized_dir(
    cls,
    lora_dir,
    expected_lora_modules,
    peft_helper,
    *,
    lora_model_id=None,
    device="cuda",
    dtype=None,
    model_vocab_size=None,
    weights_mapper=None,
    skip_prefixes=None,
    moe_ep_spec=None,
    unsupported_lora_modules=None,
):
    from vllm.lora import lora_model
    from vllm.lora.utils import get_lora_id

    filter_func = None
    if moe_ep_spec is not None:  # read only this expert-parallel rank's experts
        remote = lora_model._is_remote_expert_key

        def filter_func(name):
            return not remote(name, moe_ep_spec)

    tensors = load_adapter_tensors(lora_dir, filter_func)
    unexpected = _unexpected_modules(
        cls,
        tensors,
        expected_lora_modules,
        peft_helper,
        weights_mapper,
        skip_prefixes,
        unsupported_lora_modules,
    )
    if unexpected:
        raise ValueError(
            f"While loading {lora_dir}, expected"
            f" target modules in {expected_lora_modules}"
            f" but received {unexpected}."
            f" Please verify that the loaded LoRA module is correct"
        )
    return cls.from_lora_tensors(
        lora_model_id=get_lora_id() if lora_model_id is None else lora_model_id,
        tensors=tensors,
        peft_helper=peft_helper,
        device=device,
        dtype=dtype,
        model_vocab_size=model_vocab_size,
        weights_mapper=weights_mapper,
        skip_prefixes=skip_prefixes,
    )


def _patch_adapter_path() -> bool:
    """Remote adapter dirs in the worker: `get_adapter_absolute_path(s3://...)` -> cache dir."""
    from vllm.lora import worker_manager

    current = getattr(worker_manager, "get_adapter_absolute_path", None)
    if getattr(current, "_tensorizer_rs", False):
        return False
    problem = _mismatch("worker_manager.get_adapter_absolute_path", current)
    if problem:
        _warn_not_installed(problem, "s3:// and http(s):// adapter paths will not load")
        return False

    @functools.wraps(current)
    def get_adapter_absolute_path(lora_path):
        if is_remote(lora_path):
            return fetch_adapter(lora_path)
        return current(lora_path)

    get_adapter_absolute_path._tensorizer_rs = True
    get_adapter_absolute_path._original = current
    worker_manager.get_adapter_absolute_path = get_adapter_absolute_path
    return True


def _register_resolver() -> bool:
    base = os.environ.get(RESOLVER_ENV)
    if not base:
        return False
    try:
        from vllm.lora.resolver import LoRAResolverRegistry
    except ImportError as e:
        logger.warning(
            "tensorizer_rs: %s is set, but vLLM has no LoRA resolvers (%s)", RESOLVER_ENV, e
        )
        return False
    if "tensorizer_rs" in LoRAResolverRegistry.get_supported_resolvers():
        return False
    resolver = __getattr__("TensorizerLoRAResolver")(base)
    LoRAResolverRegistry.register_resolver("tensorizer_rs", resolver)
    logger.info("tensorizer_rs: LoRA resolver for adapters under %s", base)
    return True
