"""`TensorizerConfig` for vLLM, backed by tensorizer_rs instead of CoreWeave's `tensorizer`.

Same fields, mapping keys, defaults and error texts as vLLM 0.32's
`vllm.model_executor.model_loader.tensorizer.TensorizerConfig`, so that the dicts vLLM builds from
`--model-loader-extra-config` (and `TensorizerConfig.to_serializable()`) round-trip through either
class. This module does not import vLLM, so it can be used to build configs anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

# A child of vLLM's "vllm" logger, so our lines go through vLLM's handler and format.
logger = logging.getLogger("vllm.tensorizer_rs")

# Keys a user may not set at the top level of --model-loader-extra-config (vLLM decides them).
BLACKLISTED_TENSORIZER_ARGS = {"device", "dtype", "mode"}

#: Index name of the marker parameter that vLLM registers on the root module before
#: `write_module`; its presence means "module names, not HF names".
MARKER_KEY = ".vllm_tensorized_marker"
MARKER_ATTR = "vllm_tensorized_marker"
#: Value of the marker in files our `tensorize_vllm_model` writes: the weights were saved *before*
#: `process_weights_after_loading`, so a loader must run it. vLLM's own marker is a meta tensor
#: (read back as 0) and its files hold post-processed weights. The bytes spell "tzrs-pre".
PRE_PROCESSING_MARKER = int.from_bytes(b"tzrs-pre", "little")

_SHARD_TEMPLATE = re.compile(r"%0\dd")


def validate_config(config: dict) -> None:
    """vLLM's check of the top-level extra-config keys for load_format="tensorizer"."""
    for k, v in config.items():
        if v is not None and k in BLACKLISTED_TENSORIZER_ARGS:
            raise ValueError(f"{k} is not an allowed Tensorizer argument.")


def is_valid_deserialization_uri(uri: str | None) -> bool:
    if uri:
        from tensorizer_rs import _native

        return _native.is_remote(uri) or os.path.exists(uri)
    return False


@dataclass
class TensorizerConfig(MutableMapping):
    """Settings for loading and saving vLLM models with tensorizer_rs.

    Attributes are those of vLLM's `TensorizerConfig`: `tensorizer_uri` (a local path, `s3://`,
    `http(s)://`; `%0Nd` in it is replaced by the tensor-parallel rank), or `tensorizer_dir` (then
    the URI is `{dir}/model.tensors`); `verify_hash`, `num_readers`, `encryption_keyfile` (a path
    or URI of a raw 32-byte key), S3 credentials and endpoint, and free-form `stream_kwargs`
    (for `open_stream`), `serialization_kwargs` (for `TensorSerializer`) and
    `deserialization_kwargs` (for `TensorDeserializer`). `vllm_tensorized` is deprecated: files
    are recognised by their marker.
    """

    tensorizer_uri: str | None = None
    tensorizer_dir: str | None = None
    vllm_tensorized: bool | None = None
    verify_hash: bool | None = None
    num_readers: int | None = None
    encryption_keyfile: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_endpoint: str | None = None
    stream_kwargs: dict[str, Any] | None = None
    serialization_kwargs: dict[str, Any] | None = None
    deserialization_kwargs: dict[str, Any] | None = None
    _extra_serialization_attrs: dict[str, Any] | None = field(init=False, default=None)
    model_class: Any = field(init=False, default=None)
    hf_config: Any = field(init=False, default=None)
    dtype: Any = field(init=False, default=None)
    _is_sharded: bool = field(init=False, default=False)
    _fields: ClassVar[tuple[str, ...]]
    _keys: ClassVar[frozenset[str]]

    def __post_init__(self):
        self._is_sharded = (
            isinstance(self.tensorizer_uri, str)
            and _SHARD_TEMPLATE.search(self.tensorizer_uri) is not None
        )
        if (
            self.tensorizer_dir
            and self.tensorizer_uri
            # A copy (dataclasses.replace, for_rank) passes the dir derived from the URI back in.
            and self.tensorizer_dir.rstrip("/") != os.path.dirname(self.tensorizer_uri)
        ):
            logger.warning(
                "Provided both tensorizer_dir and tensorizer_uri. "
                "Inferring tensorizer_dir from tensorizer_uri as the "
                "latter takes precedence."
            )
            self.tensorizer_dir = os.path.dirname(self.tensorizer_uri)
        if not self.tensorizer_uri:
            if self.tensorizer_dir:
                self.tensorizer_uri = f"{self.tensorizer_dir}/model.tensors"
            else:
                raise ValueError(
                    "Unable to resolve tensorizer_uri. "
                    "A valid tensorizer_uri or tensorizer_dir must be provided."
                )
        else:
            self.tensorizer_dir = os.path.dirname(self.tensorizer_uri)
        if not self.serialization_kwargs:
            self.serialization_kwargs = {}
        if not self.deserialization_kwargs:
            self.deserialization_kwargs = {}

    def to_serializable(self) -> dict[str, Any]:
        """The non-None public init fields, without `tensorizer_dir` (implied by the URI).

        `TensorizerConfig(**cfg.to_serializable())` rebuilds an equivalent config; this is the
        form that crosses process boundaries (and what vLLM's `EngineArgs` uses).
        """
        raw = asdict(self)
        drop = {"tensorizer_dir"} if "tensorizer_uri" in raw else set()
        return {
            k: v
            for k, v in raw.items()
            if k not in drop and not k.startswith("_") and v is not None
        }

    def _construct_tensorizer_args(self) -> TensorizerArgs:
        return TensorizerArgs(self)

    def verify_with_parallel_config(self, parallel_config) -> None:
        if parallel_config.tensor_parallel_size > 1 and not self._is_sharded:
            raise ValueError(
                "For a sharded model, tensorizer_uri should include a"
                " string format template like '%04d' to be formatted"
                " with the rank of the shard"
            )

    def verify_with_model_config(self, model_config) -> None:
        if model_config.quantization is not None and self.tensorizer_uri is not None:
            logger.warning(
                "Loading a model using Tensorizer with quantization on vLLM"
                " is unstable and may lead to errors."
            )

    def open_stream(self, tensorizer_args: TensorizerArgs | None = None):
        from tensorizer_rs.stream_io import open_stream

        if tensorizer_args is None:
            tensorizer_args = self._construct_tensorizer_args()
        return open_stream(self.tensorizer_uri, **tensorizer_args.stream_kwargs)

    def for_rank(self, rank: int) -> TensorizerConfig:
        """A copy whose URI has the shard template filled in (unchanged if not sharded)."""
        cfg = dataclasses.replace(self)
        if self._is_sharded:
            cfg.tensorizer_uri = self.tensorizer_uri % rank
            cfg._is_sharded = False
        return cfg

    # MutableMapping over every field name, as in vLLM.
    def keys(self):
        return self._keys

    def __len__(self):
        return len(fields(self))

    def __iter__(self):
        return iter(self._fields)

    def __getitem__(self, item: str) -> Any:
        if item not in self.keys():
            raise KeyError(item)
        return getattr(self, item)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self.keys():
            raise KeyError(key)
        setattr(self, key, value)

    def __delitem__(self, key, /):
        if key not in self.keys():
            raise KeyError(key)
        delattr(self, key)


TensorizerConfig._fields = tuple(f.name for f in fields(TensorizerConfig))
TensorizerConfig._keys = frozenset(TensorizerConfig._fields)
INIT_FIELDS = frozenset(f.name for f in fields(TensorizerConfig) if f.init)


class TensorizerArgs:
    """The keyword arguments a config turns into, as vLLM's `TensorizerArgs` does.

    `stream_kwargs` go to `open_stream`, `deserialization_kwargs` to `TensorDeserializer`. The key
    file (a path or URI) is read here and becomes `DecryptionParams`. The env vars
    `S3_ACCESS_KEY_ID`, `S3_SECRET_ACCESS_KEY` and `S3_ENDPOINT_URL` fill the attributes only,
    as in vLLM; `open_stream` applies its own fallbacks when the stream kwargs are None.
    """

    def __init__(self, tensorizer_config: TensorizerConfig):
        for k, v in tensorizer_config.items():
            setattr(self, k, v)
        self.file_obj = tensorizer_config.tensorizer_uri
        self.s3_access_key_id = tensorizer_config.s3_access_key_id or os.environ.get(
            "S3_ACCESS_KEY_ID"
        )
        self.s3_secret_access_key = tensorizer_config.s3_secret_access_key or os.environ.get(
            "S3_SECRET_ACCESS_KEY"
        )
        self.s3_endpoint = tensorizer_config.s3_endpoint or os.environ.get("S3_ENDPOINT_URL")
        self.stream_kwargs = stream_kwargs_of(tensorizer_config)
        self.deserialization_kwargs = {
            "verify_hash": tensorizer_config.verify_hash,
            "encryption": tensorizer_config.encryption_keyfile,
            "num_readers": tensorizer_config.num_readers,
            **(tensorizer_config.deserialization_kwargs or {}),
        }
        if self.encryption_keyfile:
            from tensorizer_rs import DecryptionParams

            self.deserialization_kwargs["encryption"] = DecryptionParams.from_key(
                read_bytes(tensorizer_config.encryption_keyfile, self.stream_kwargs)
            )

    @staticmethod
    def add_cli_args(parser):
        """vLLM's "tensorizer options" flags (argparse), for scripts such as
        examples/tensorize_vllm_model.py."""
        group = parser.add_argument_group(
            "tensorizer options",
            description="Options for the tensorizer_rs deserializer when load_format=tensorizer "
            "(also accepted as keys of --model-loader-extra-config).",
        )
        group.add_argument(
            "--tensorizer-uri",
            type=str,
            help="Path to serialized model tensors: a local path, or an HTTP(S) or S3 URI.",
        )
        group.add_argument(
            "--verify-hash",
            action="store_true",
            help="Check each tensor's stored hashes; a mismatch raises HashMismatchError.",
        )
        group.add_argument(
            "--encryption-keyfile",
            type=str,
            default=None,
            help="Path or S3 URI of the binary key to decrypt with.",
        )
        group.add_argument(
            "--num-readers",
            default=None,
            type=int,
            help="How many threads read the file concurrently (default: chosen automatically).",
        )
        group.add_argument(
            "--s3-access-key-id",
            type=str,
            default=None,
            help="S3 access key (or env S3_ACCESS_KEY_ID).",
        )
        group.add_argument(
            "--s3-secret-access-key",
            type=str,
            default=None,
            help="S3 secret key (or env S3_SECRET_ACCESS_KEY).",
        )
        group.add_argument(
            "--s3-endpoint",
            type=str,
            default=None,
            help="S3 endpoint (or env S3_ENDPOINT_URL).",
        )
        return parser

    def source(self, uri: str | None = None):
        """What to hand to `TensorDeserializer`: the URI itself when no stream option is set
        (so the reader opens and re-opens it natively), else a stream from `open_stream`."""
        uri = uri or self.tensorizer_uri
        if not any(v is not None for v in self.stream_kwargs.values()):
            return uri
        from tensorizer_rs.stream_io import open_stream

        return open_stream(uri, **{"mode": "rb", **self.stream_kwargs})


def stream_kwargs_of(tensorizer_config: TensorizerConfig) -> dict[str, Any]:
    """Keyword arguments for `open_stream`: the explicit S3 settings, then `stream_kwargs`."""
    return {
        "s3_access_key_id": tensorizer_config.s3_access_key_id,
        "s3_secret_access_key": tensorizer_config.s3_secret_access_key,
        "s3_endpoint": tensorizer_config.s3_endpoint,
        **(tensorizer_config.stream_kwargs or {}),
    }


def read_bytes(uri: str, stream_kwargs: dict[str, Any]) -> bytes:
    from tensorizer_rs.stream_io import open_stream

    with open_stream(uri, **stream_kwargs) as stream:
        return stream.read()


def _probe(tensorizer_config: TensorizerConfig, read_marker: bool) -> tuple[frozenset, int | None]:
    """Open the file's index only (lazy_load): its tensor names, and the marker's value.

    The value (an 8-byte tensor, decrypted if needed) is read only when asked and present;
    vLLM's meta marker reads back as 0.
    """
    from tensorizer_rs import TensorDeserializer
    from tensorizer_rs.stream_io import open_stream

    args = tensorizer_config._construct_tensorizer_args()
    # Same call shape as vLLM's is_vllm_tensorized, so bad stream kwargs fail the same way.
    stream = open_stream(args.tensorizer_uri, **args.stream_kwargs)
    try:
        with TensorDeserializer(
            stream, device="cpu", lazy_load=True, **args.deserialization_kwargs
        ) as d:
            keys = frozenset(d.keys())
            value = None
            if read_marker and MARKER_KEY in keys:
                t = d[MARKER_KEY]
                value = int(t.reshape(-1)[0]) if t.numel() == 1 and not t.is_floating_point() else 0
            return keys, value
    finally:
        stream.close()


def is_vllm_tensorized(tensorizer_config: TensorizerConfig) -> bool:
    """True if the file holds vLLM module names (has `.vllm_tensorized_marker`) or the config
    says `vllm_tensorized=True` (deprecated). Reads the index only."""
    if tensorizer_config.vllm_tensorized:
        logger.warning(
            "Please note that newly serialized vLLM models are automatically "
            "inferred as vLLM models, so setting vllm_tensorized=True is "
            "only necessary for models serialized prior to this change."
        )
        return True
    return MARKER_KEY in _probe(tensorizer_config, read_marker=False)[0]
