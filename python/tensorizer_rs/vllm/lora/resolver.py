"""A LoRA resolver: an unknown model name `NAME` is the adapter dir `<base>/NAME` (local,
`s3://`, `http(s)://`) when its `adapter_config.json` exists. Registered by
`vllm/patches.py` when `TENSORIZER_RS_LORA_RESOLVER_DIR` is set."""

from __future__ import annotations

import asyncio
import os

from .fetch import _open_remote
from .settings import ADAPTER_CONFIG, _env_stream_kwargs, is_remote


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
            from tensorizer_rs import _native

            parts = lora_name.split("/")
            # A name, not a URI or a path out of the base dir.
            uri = bool(lora_name) and _native.uri_scheme(lora_name) is not None
            if not lora_name or uri or lora_name.startswith("/") or ".." in parts:
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
