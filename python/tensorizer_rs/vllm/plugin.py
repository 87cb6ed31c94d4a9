"""vLLM general plugin (entry point `vllm.general_plugins: tensorizer_rs`).

vLLM calls `register()` once in every process it starts (front end, engine core, workers).
It makes `load_format="tensorizer"` use tensorizer_rs, adds `load_format=
"tensorizer_rs_serialize"` (used by `tensorize_vllm_model`), and installs the patches of vLLM's
internals (`patches.install`: the config and tokenizer of `s3://` model dirs without
runai-model-streamer, tensorized LoRA adapters, local or remote). Needs vLLM >= 0.10.1 for
`register_model_loader`; on older versions it logs a warning and changes nothing. On vLLM's CPU
backend it also requests the AMX permission that vLLM's attention kernel needs but does not ask
for (`_request_amx_permission`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.tensorizer_rs")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    try:
        from vllm.model_executor import model_loader
    except ImportError as e:  # not a vLLM process after all
        logger.warning("tensorizer_rs: vLLM not importable (%s); plugin not registered", e)
        return
    register_model_loader = getattr(model_loader, "register_model_loader", None)
    if register_model_loader is None:
        logger.warning(
            "tensorizer_rs: this vLLM has no register_model_loader (needs vLLM >= 0.10.1); "
            "load_format='tensorizer' stays vLLM's built-in loader"
        )
        return

    from .loader import TensorizerRsLoader, TensorizerRsSerializeLoader
    from .serialize import SERIALIZE_FORMAT

    _register_quietly(register_model_loader, "tensorizer", TensorizerRsLoader)
    _register_quietly(register_model_loader, SERIALIZE_FORMAT, TensorizerRsSerializeLoader)
    # s3:// model dirs and LoRA adapters with adapter_model.tensors; each patch checks the
    # signature of what it wraps and otherwise warns and leaves vLLM alone.
    from . import patches

    patches.install()
    _request_amx_permission()
    _registered = True


def _register_quietly(register_model_loader, load_format: str, cls) -> None:
    """`register_model_loader(load_format)(cls)` without vLLM's warning that `load_format` is
    already registered and will be overwritten: replacing vLLM's own "tensorizer" loader is what
    this plugin is for, and vLLM said so once in every process it starts."""
    vllm_logger = logging.getLogger(register_model_loader.__module__)

    def drop(record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and "already registered" in record.msg)

    vllm_logger.addFilter(drop)
    try:
        register_model_loader(load_format)(cls)
    finally:
        vllm_logger.removeFilter(drop)


def _request_amx_permission() -> None:
    """Ask Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM) in vLLM CPU processes.

    vLLM 0.32's CPU attention kernel (`_C.abi3.so`, cpu_attn_amx.hpp) executes AMX instructions
    (`tilezero`) without requesting that permission, which Linux >= 5.16 requires per process:
    the worker dies with SIGILL on its first forward pass unless something else (a oneDNN
    matmul that picked AMX, e.g. for a first batch of 5+ tokens) asked before. torch's
    `_init_amx` makes the request (what oneDNN does); it changes nothing else.
    """
    try:
        import torch
        from vllm.platforms import current_platform

        cpu = getattr(torch, "cpu", None)
        if current_platform.is_cpu() and cpu is not None and cpu._is_amx_tile_supported():
            cpu._init_amx()
    except Exception as e:  # noqa: BLE001 - best effort; vLLM works without it on most inputs
        logger.debug("tensorizer_rs: AMX permission request skipped: %s", e)
