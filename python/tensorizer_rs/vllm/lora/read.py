"""Reading a tensorized adapter: its tensors through `TensorDeserializer` (parallel reads,
decryption in memory), and vLLM's `LoRAModel` from them (what the hooked
`LoRAModel.from_local_checkpoint` does for such dirs, see `vllm/patches.py`)."""

from __future__ import annotations

import os
import time
from typing import Any

from ..config import TensorizerConfig, logger, read_bytes
from .settings import CONFIG_ENV, SIDECAR, adapter_read_config, is_remote


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


def from_tensorized_dir(
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
    """vLLM 0.32's `LoRAModel.from_local_checkpoint` for a dir with `adapter_model.tensors`:
    the tensors from `load_adapter_tensors`, vLLM's unexpected-modules check, then
    `cls.from_lora_tensors`."""
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
