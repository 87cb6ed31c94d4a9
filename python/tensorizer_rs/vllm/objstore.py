"""Config and tokenizer files of `s3://` model dirs, fetched with tensorizer_rs.

vLLM 0.32 handles `--model s3://bucket/dir` in `ModelConfig.maybe_pull_model_tokenizer_for_runai`:
`ObjectStorageModel(url).pull_files(url, allow_pattern=[...] | ignore_pattern=[...])` mirrors the
dir's small files into a local cache dir through `runai_model_streamer.pull_files`. Without that
package installed it fails. When it is missing, `install()` (called by the plugin in every vLLM
process) replaces `pull_files` for `s3://` URLs with one that reads through
`tensorizer_rs.stream_io.open_stream`.

vLLM 0.32 then refuses the engine config (`VllmConfig`: "To load a model from object storage
(S3/GCS/Azure), 'load_format' must be 'modelexpress', 'runai_streamer' or
'runai_streamer_sharded'"), although its own tensorizer example documents `vllm serve s3://...
--load-format tensorizer`. `install()` therefore also wraps `EngineArgs.create_engine_config` so
that, for load_format "tensorizer" only, that check does not see the s3:// model as object
storage (the weights come from `tensorizer_uri`, which vLLM derives from the s3:// `--model`).

Our storage layer has no listing call, so this fetches a fixed list of well-known config and
tokenizer file names (those absent are skipped); custom `*.py` code for `trust_remote_code` is not
found this way. Credentials: vLLM's `S3_ACCESS_KEY_ID`, `S3_SECRET_ACCESS_KEY`, `S3_ENDPOINT_URL`
when set, else open_stream's own lookup (s3cmd config, AWS env and files).
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import os

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


# (model_path, dest_dir) -> names already fetched in this process: vLLM pulls the same dir twice
# (configs, then everything but weights).
_fetched: dict[tuple[str, str], set] = {}


def _selected(name: str, allow_pattern, ignore_pattern) -> bool:
    if allow_pattern is not None and not any(fnmatch.fnmatch(name, p) for p in allow_pattern):
        return False
    return not (ignore_pattern and any(fnmatch.fnmatch(name, p) for p in ignore_pattern))


def _stream_kwargs() -> dict:
    env = {
        "s3_access_key_id": "S3_ACCESS_KEY_ID",
        "s3_secret_access_key": "S3_SECRET_ACCESS_KEY",
        "s3_endpoint": "S3_ENDPOINT_URL",
    }
    return {k: os.environ[v] for k, v in env.items() if os.environ.get(v)}


def pull_files(
    model_path: str, dest_dir: str, allow_pattern=None, ignore_pattern=None
) -> list[str]:
    """Copy the known files present under `model_path` (s3://bucket/prefix) into `dest_dir`.

    Returns the names copied (files already fetched to `dest_dir` in this process are not
    fetched again). Raises if `config.json` was wanted and could not be read (the
    model cannot load without it), with the storage error as the cause.
    """
    from tensorizer_rs.stream_io import open_stream

    base = model_path.rstrip("/")
    kwargs = _stream_kwargs()
    done = _fetched.setdefault((base, os.path.abspath(dest_dir)), set())
    copied = []
    for name in KNOWN_FILES:
        if name in done or not _selected(name, allow_pattern, ignore_pattern):
            continue
        try:
            with open_stream(f"{base}/{name}", mode="rb", **kwargs) as f:
                data = f.read()
        except OSError as e:  # absent (404) or unreadable
            if name == "config.json":
                raise OSError(f"could not read {base}/config.json: {e}") from e
            continue
        tmp = os.path.join(dest_dir, f".{name}.part")
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, os.path.join(dest_dir, name))
        done.add(name)
        copied.append(name)
    logger.info("tensorizer_rs: fetched %s from %s", ", ".join(copied) or "nothing", base)
    return copied


def install() -> bool:
    """Apply both patches (see the module docstring); returns True if anything was patched."""
    return _patch_pull_files() | _patch_object_storage_check()


def _patch_pull_files() -> bool:
    """Route vLLM's object-storage file pulls for s3:// through tensorizer_rs, unless
    runai-model-streamer is installed (then vLLM's own path works)."""
    if importlib.util.find_spec("runai_model_streamer") is not None:
        return False
    try:
        from vllm.transformers_utils import runai_utils
    except ImportError:
        return False
    cls = getattr(runai_utils, "ObjectStorageModel", None)
    original = getattr(cls, "pull_files", None)
    if original is None or getattr(original, "_tensorizer_rs", False):
        return False

    def patched(self, model_path: str = "", allow_pattern=None, ignore_pattern=None) -> None:
        if not model_path.lower().startswith("s3://"):
            return original(self, model_path, allow_pattern, ignore_pattern)
        pull_files(model_path, self.dir, allow_pattern, ignore_pattern)
        return None

    patched._tensorizer_rs = True
    patched._original = original
    patched.__doc__ = original.__doc__
    cls.pull_files = patched
    return True


def _patch_object_storage_check() -> bool:
    """Let load_format="tensorizer" pass VllmConfig's object-storage load-format check."""
    try:
        from vllm.config import vllm as vllm_config_module
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return False
    original = EngineArgs.create_engine_config
    if getattr(original, "_tensorizer_rs", False) or not hasattr(
        vllm_config_module, "is_runai_obj_uri"
    ):
        return False

    def create_engine_config(self, *args, **kwargs):
        if str(self.load_format).lower() != "tensorizer" or not str(self.model).lower().startswith(
            "s3://"
        ):
            return original(self, *args, **kwargs)
        with _not_object_storage(vllm_config_module):
            return original(self, *args, **kwargs)

    create_engine_config._tensorizer_rs = True
    create_engine_config._original = original
    create_engine_config.__doc__ = original.__doc__
    EngineArgs.create_engine_config = create_engine_config
    return True


@contextlib.contextmanager
def _not_object_storage(module):
    check = module.is_runai_obj_uri
    module.is_runai_obj_uri = lambda uri: False
    try:
        yield
    finally:
        module.is_runai_obj_uri = check
