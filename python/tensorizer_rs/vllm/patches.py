"""Every change the plugin makes to vLLM's internals, in one place.

Each patch wraps one vLLM function, and only if its parameters are the ones it was tested with
(`TESTED_SIGNATURES`, vLLM 0.32); otherwise it logs a warning and leaves vLLM alone. What a
patch does instead lives with its concern; here is only how it is hooked in:

* `LoRAModel.from_local_checkpoint`: adapter dirs with `adapter_model.tensors` (and no standard
  weights file) are read by `lora.read.from_tensorized_dir`.
* `worker_manager.get_adapter_absolute_path`: `s3://` / `http(s)://` adapter dirs become a local
  cache dir (`lora.fetch.fetch_adapter`).
* With `TENSORIZER_RS_LORA_RESOLVER_DIR`, a LoRA resolver is registered (vLLM's own registry;
  not a patch, but installed here too).
* `ObjectStorageModel.pull_files`: the config and tokenizer of `s3://` model dirs through our
  storage (`objstore.pull_into`), where runai-model-streamer is not installed.
* `EngineArgs.create_engine_config`: for load_format "tensorizer" with an `s3://` model, the
  weights' URI is set and, while it runs, `vllm.config.vllm.is_runai_obj_uri` answers no for the
  model (`objstore.s3_model_config`), so vLLM's object-storage check lets it through.

Wrapped functions keep what they wrap as `_original`, and are marked `_tensorizer_rs`, so a
second `install()` changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect

from tensorizer_rs import _native

from .config import logger

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
    "ObjectStorageModel.pull_files": ("self", "model_path", "allow_pattern", "ignore_pattern"),
    "EngineArgs.create_engine_config": ("self", "usage_context", "headless"),
    "config.vllm.is_runai_obj_uri": ("model_or_path",),
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


def _warn_not_installed(what: str, problem: str, consequence: str) -> None:
    logger.warning(
        "tensorizer_rs: not hooking %s: %s. %s; vLLM's own behaviour is unchanged.",
        what,
        problem,
        consequence,
    )


def install() -> bool:
    """Every patch this vLLM allows (called by the plugin in every vLLM process). Returns True
    if anything was installed."""
    done = install_lora()
    return install_object_storage() or done


# ----------------------------------------------------------------------------- LoRA
def install_lora() -> bool:
    """The LoRA hooks and, if `TENSORIZER_RS_LORA_RESOLVER_DIR` is set, the resolver."""
    try:
        from vllm.lora import lora_model, utils, worker_manager  # noqa: F401
    except ImportError as e:
        logger.debug("tensorizer_rs: no vllm.lora (%s); LoRA hooks not installed", e)
        return False
    done = patch_from_local_checkpoint()
    done = patch_adapter_path() or done
    return register_resolver() or done


def patch_from_local_checkpoint() -> bool:
    from vllm.lora import lora_model, utils

    from .lora.read import from_tensorized_dir
    from .lora.settings import ADAPTER_TENSORS, is_tensorized_adapter_dir

    cls = getattr(lora_model, "LoRAModel", None)
    current = getattr(cls, "from_local_checkpoint", None)
    if getattr(current, "_tensorizer_rs", False):
        return False
    what, consequence = (
        "vLLM's LoRA loading",
        f"Adapter dirs with only {ADAPTER_TENSORS} will not load",
    )
    for name, fn in (
        ("LoRAModel.from_local_checkpoint", current),
        ("LoRAModel.from_lora_tensors", getattr(cls, "from_lora_tensors", None)),
        ("utils.parse_fine_tuned_lora_name", getattr(utils, "parse_fine_tuned_lora_name", None)),
    ):
        problem = _mismatch(name, fn)
        if problem:
            _warn_not_installed(what, problem, consequence)
            return False
    # What the replacement calls besides the functions above.
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
            what,
            f"vLLM lacks {missing}" if missing else "from_local_checkpoint is not a classmethod",
            consequence,
        )
        return False
    original = raw.__func__

    @functools.wraps(original)
    def from_local_checkpoint(klass, lora_dir, expected_lora_modules, peft_helper, **kwargs):
        if not is_tensorized_adapter_dir(lora_dir):
            return original(klass, lora_dir, expected_lora_modules, peft_helper, **kwargs)
        return from_tensorized_dir(klass, lora_dir, expected_lora_modules, peft_helper, **kwargs)

    from_local_checkpoint._tensorizer_rs = True
    from_local_checkpoint._original = raw
    cls.from_local_checkpoint = classmethod(from_local_checkpoint)
    return True


def patch_adapter_path() -> bool:
    """Remote adapter dirs in the worker: `get_adapter_absolute_path(s3://...)` -> cache dir."""
    from vllm.lora import worker_manager

    from .lora.fetch import fetch_adapter
    from .lora.settings import is_remote

    current = getattr(worker_manager, "get_adapter_absolute_path", None)
    if getattr(current, "_tensorizer_rs", False):
        return False
    problem = _mismatch("worker_manager.get_adapter_absolute_path", current)
    if problem:
        _warn_not_installed(
            "vLLM's LoRA loading", problem, "s3:// and http(s):// adapter paths will not load"
        )
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


def register_resolver() -> bool:
    from .lora.settings import RESOLVER_ENV, resolver_base

    base = resolver_base()
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
    from .lora.resolver import TensorizerLoRAResolver

    LoRAResolverRegistry.register_resolver("tensorizer_rs", TensorizerLoRAResolver(base))
    logger.info("tensorizer_rs: LoRA resolver for adapters under %s", base)
    return True


# ----------------------------------------------------------------------------- s3:// model dirs
def install_object_storage() -> bool:
    """Both object-storage patches (see the module docstring)."""
    return patch_pull_files() | patch_object_storage_check()


def patch_pull_files() -> bool:
    """Route vLLM's object-storage file pulls for s3:// through tensorizer_rs, unless
    runai-model-streamer is installed (then vLLM's own path works)."""
    if importlib.util.find_spec("runai_model_streamer") is not None:
        return False
    try:
        from vllm.transformers_utils import runai_utils
    except ImportError:
        return False
    from . import objstore

    cls = getattr(runai_utils, "ObjectStorageModel", None)
    original = getattr(cls, "pull_files", None)
    if original is None or getattr(original, "_tensorizer_rs", False):
        return False
    problem = _mismatch("ObjectStorageModel.pull_files", original)
    if problem:
        _warn_not_installed(
            "vLLM's object-storage pulls", problem, "s3:// model dirs need runai-model-streamer"
        )
        return False

    def patched(self, model_path: str = "", allow_pattern=None, ignore_pattern=None) -> None:
        if _native.uri_scheme(model_path) != "s3":
            return original(self, model_path, allow_pattern, ignore_pattern)
        objstore.pull_into(self, model_path, allow_pattern, ignore_pattern)
        return None

    patched._tensorizer_rs = True
    patched._original = original
    patched.__doc__ = original.__doc__
    cls.pull_files = patched
    return True


def patch_object_storage_check() -> bool:
    """Let load_format="tensorizer" pass VllmConfig's object-storage load-format check."""
    try:
        from vllm.config import vllm as vllm_config_module
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return False
    from . import objstore

    original = EngineArgs.create_engine_config
    if getattr(original, "_tensorizer_rs", False):
        return False
    for what, fn in (
        ("EngineArgs.create_engine_config", original),
        ("config.vllm.is_runai_obj_uri", getattr(vllm_config_module, "is_runai_obj_uri", None)),
    ):
        problem = _mismatch(what, fn)
        if problem:
            _warn_not_installed(
                "vLLM's engine config",
                problem,
                "`vllm serve s3://... --load-format tensorizer` fails",
            )
            return False

    def create_engine_config(self, *args, **kwargs):
        if not objstore.is_tensorizer_s3(self):
            return original(self, *args, **kwargs)
        with objstore.s3_model_config(self), _not_object_storage(vllm_config_module):
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
