"""Config and tokenizer files of `s3://` model dirs, fetched with tensorizer_rs.

vLLM 0.32 handles `--model s3://bucket/dir` in `ModelConfig.maybe_pull_model_tokenizer_for_runai`:
`ObjectStorageModel(url).pull_files(url, allow_pattern=[...] | ignore_pattern=[...])` mirrors the
dir's small files into a local cache dir through `runai_model_streamer.pull_files`. Without that
package installed it fails. When it is missing, `tensorizer_rs.vllm.patches` (installed by the
plugin in every vLLM process) sends `pull_files` for `s3://` URLs to `pull_into`, which reads
through `tensorizer_rs.stream_io.open_stream`.

vLLM 0.32 then refuses the engine config (`VllmConfig`: "To load a model from object storage
(S3/GCS/Azure), 'load_format' must be 'modelexpress', 'runai_streamer' or
'runai_streamer_sharded'"), although its own tensorizer example documents `vllm serve s3://...
--load-format tensorizer`. The patches therefore also wrap `EngineArgs.create_engine_config` so
that, for load_format "tensorizer" only, that check does not see the s3:// model as object
storage (`is_tensorizer_s3`). The weights are read from `{s3 dir}/model.tensors` by our loader:
vLLM derives `tensorizer_dir` from `model` only after replacing it with the local mirror, so the
wrapper sets `tensorizer_uri` to the S3 location first (unless the extra config names a URI or
dir itself), in `s3_model_config`.

Our storage layer has no listing call, so this fetches a fixed list of well-known config and
tokenizer file names (those absent are skipped); custom `*.py` code for `trust_remote_code` is not
found this way. Credentials and endpoint are those of the weights: the `s3_access_key_id`,
`s3_secret_access_key`, `s3_endpoint` and `stream_kwargs` of the extra config when given (while
the wrapped `create_engine_config` runs), else tensorizer_rs's own lookup, which starts with
vLLM's `S3_ACCESS_KEY_ID`, `S3_SECRET_ACCESS_KEY` and `S3_ENDPOINT_URL` (then the s3cmd config,
then the AWS environment and files).
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import os
from concurrent.futures import ThreadPoolExecutor

from .config import logger

#: File names looked for in an s3:// model dir (transformers/vLLM configs and tokenizers).
KNOWN_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "params.json",
    "tekken.json",
    "quantize_config.json",
    "hf_quant_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


#: Storage options for the pulls of the engine config being built (see `s3_model_config`):
#: the S3 settings of load_format="tensorizer"'s extra config, so that config, tokenizer and
#: weights are read with the same credentials and endpoint.
_storage: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "tensorizer_rs_objstore_storage", default=None
)

_CREDENTIALS_HINT = (
    ". S3 settings come from the load format's extra config (s3_access_key_id,"
    " s3_secret_access_key, s3_endpoint), else S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY and"
    " S3_ENDPOINT_URL, ~/.s3cfg, then the AWS environment and files"
)

#: Fetches run concurrently (each is one small GET; most names are absent).
_PARALLEL = 8


def _selected(name: str, allow_pattern, ignore_pattern) -> bool:
    if allow_pattern is not None and not any(fnmatch.fnmatch(name, p) for p in allow_pattern):
        return False
    return not (ignore_pattern and any(fnmatch.fnmatch(name, p) for p in ignore_pattern))


def storage_options_of(extra) -> dict:
    """`open_stream` keyword arguments from a load_format="tensorizer" extra config (a dict or a
    TensorizerConfig): `s3_access_key_id`, `s3_secret_access_key`, `s3_endpoint`, then
    `stream_kwargs`, as the weights are opened. Unset ones are left out, so tensorizer_rs's own
    lookup fills them (`S3_ACCESS_KEY_ID`, `S3_SECRET_ACCESS_KEY`, `S3_ENDPOINT_URL`, s3cmd
    config, AWS environment and files)."""
    if hasattr(extra, "to_serializable"):
        extra = extra.to_serializable()
    extra = dict(extra or {})
    kwargs = {k: extra.get(k) for k in ("s3_access_key_id", "s3_secret_access_key", "s3_endpoint")}
    kwargs.update(extra.get("stream_kwargs") or {})
    kwargs.pop("mode", None)
    return {k: v for k, v in kwargs.items() if v is not None}


def _fetch(uri: str, kwargs: dict) -> bytes:
    from tensorizer_rs.stream_io import open_stream

    with open_stream(uri, mode="rb", **kwargs) as f:
        return f.read()


def pull_files(
    model_path: str,
    dest_dir: str,
    allow_pattern=None,
    ignore_pattern=None,
    skip=frozenset(),
    storage: dict | None = None,
) -> list[str]:
    """Copy the known files present under `model_path` (s3://bucket/prefix) into `dest_dir`.

    Returns the names copied, in `KNOWN_FILES` order; names in `skip` are not fetched.
    `storage`: `open_stream` keyword arguments (default: those of the engine config being built,
    else none, so tensorizer_rs's credential lookup applies). A missing `config.json`, or any
    error reading it (access denied, unreachable endpoint), raises: the model cannot load
    without it. Other files that are absent are skipped; other errors on them are logged.
    """
    base = model_path.rstrip("/")
    kwargs = _storage.get() if storage is None else storage
    kwargs = dict(kwargs or {})
    names = [
        n for n in KNOWN_FILES if n not in skip and _selected(n, allow_pattern, ignore_pattern)
    ]

    def fetch(name):
        try:
            return name, _fetch(f"{base}/{name}", kwargs), None
        except OSError as e:
            return name, None, e

    with ThreadPoolExecutor(max_workers=_PARALLEL) as pool:
        results = list(pool.map(fetch, names))
    copied, failed = [], []
    for name, data, error in results:
        if error is not None:
            if name == "config.json":
                missing = isinstance(error, FileNotFoundError)
                raise (FileNotFoundError if missing else OSError)(
                    f"could not fetch the model config of {base}: {error}"
                    + ("" if missing else _CREDENTIALS_HINT)
                ) from error
            if not isinstance(error, FileNotFoundError):
                failed.append(f"{name} ({error})")
            continue
        tmp = os.path.join(dest_dir, f".{name}.part")
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, os.path.join(dest_dir, name))
        copied.append(name)
    if failed:
        logger.warning("tensorizer_rs: could not read from %s: %s", base, "; ".join(failed))
    logger.info("tensorizer_rs: fetched %s from %s", ", ".join(copied) or "nothing", base)
    return copied


def pull_into(model, model_path: str, allow_pattern=None, ignore_pattern=None) -> None:
    """vLLM's `ObjectStorageModel.pull_files` for an s3:// URL: into the instance's dir. vLLM
    pulls twice into one instance (configs, then everything but weights): each file is fetched
    once per instance (a later LLM() with the same URL fetches afresh)."""
    done = model.__dict__.setdefault("_tensorizer_rs_fetched", set())
    done.update(pull_files(model_path, model.dir, allow_pattern, ignore_pattern, skip=done))


def is_tensorizer_s3(engine_args) -> bool:
    """An engine with load_format="tensorizer" whose model is an s3:// dir."""
    from tensorizer_rs import _native

    return (
        str(engine_args.load_format).lower() == "tensorizer"
        and _native.uri_scheme(str(engine_args.model)) == "s3"
    )


@contextlib.contextmanager
def s3_model_config(engine_args):
    """While vLLM builds such an engine's config: the weights at `{s3 dir}/model.tensors`
    unless the extra config names a URI or dir, and the config and tokenizer files pulled with
    the weights' S3 settings."""
    extra = engine_args.model_loader_extra_config
    if hasattr(extra, "to_serializable"):  # as vLLM's create_load_config does
        extra = extra.to_serializable()
    extra = dict(extra or {})
    if not extra.get("tensorizer_uri") and not extra.get("tensorizer_dir"):
        # vLLM replaces `model` by its local mirror of the config files before it derives
        # tensorizer_dir from it; the weights stay at {s3 dir}/model.tensors.
        extra["tensorizer_uri"] = f"{str(engine_args.model).rstrip('/')}/model.tensors"
    engine_args.model_loader_extra_config = extra
    token = _storage.set(storage_options_of(extra))
    try:
        yield
    finally:
        _storage.reset(token)
