"""LoRA adapters stored with tensorizer_rs and served by vLLM.

vLLM 0.32 removed its tensorizer LoRA support (`tensorize_lora_adapter`,
`LoRARequest.tensorizer_config_dict`). This package brings it back, for every place vLLM takes an
adapter (`LLM.generate(lora_request=...)`, `vllm serve --lora-modules`, `/v1/load_lora_adapter`,
LoRA resolvers), one module per concern:

* `serialize`: `tensorize_lora_adapter(lora_path, tensorizer_config)` writes a PEFT adapter as
  `adapter_config.json` (plain JSON, vLLM reads it itself) + `adapter_model.tensors` into
  `tensorizer_config.tensorizer_dir` (local or `s3://`), encrypted when the config has a key file.
* `settings`: how an adapter is read (key file, `num_readers`, `verify_hash`, S3 settings): the
  JSON object in the env var `TENSORIZER_RS_LORA_CONFIG` (for all adapters of the process),
  overridden field by field by an `adapter_tensorizer_config.json` in the adapter dir (per
  adapter; written by `prepare_lora_dir` and `lora_request_from_tensorizer_config`). A key is
  used only for encrypted files, so one key setting can serve encrypted and plain adapters.
* `read`: the adapter's tensors through `TensorDeserializer` (parallel reads, decryption in
  memory), handed to `LoRAModel.from_lora_tensors`.
* `fetch`: an `s3://` / `http(s)://` adapter dir as a local cache dir (`adapter_config.json`
  copied, the tensors read straight from the remote object), `prepare_lora_dir`, and
  `lora_request_from_tensorizer_config(name, id, tensorizer_config_dict)` for vLLM <= 0.31-style
  config dicts.
* `resolver`: `TensorizerLoRAResolver`: with `TENSORIZER_RS_LORA_RESOLVER_DIR=<local dir | s3://
  | https://>` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`, a request for an unknown model name
  `NAME` loads the adapter at `<dir>/NAME`.

The hooks that route vLLM's adapter loading here are in `tensorizer_rs.vllm.patches`, with
every other change the plugin makes to vLLM.
"""

from .fetch import fetch_adapter, lora_request_from_tensorizer_config, prepare_lora_dir
from .read import load_adapter_tensors
from .serialize import tensorize_lora_adapter
from .settings import (
    ADAPTER_CONFIG,
    ADAPTER_TENSORS,
    CACHE_ENV,
    CONFIG_ENV,
    RESOLVER_ENV,
    SIDECAR,
    STANDARD_WEIGHTS,
    adapter_read_config,
    cache_root,
    env_settings,
    is_remote,
    is_tensorized_adapter_dir,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_TENSORS",
    "CACHE_ENV",
    "CONFIG_ENV",
    "RESOLVER_ENV",
    "SIDECAR",
    "STANDARD_WEIGHTS",
    "TensorizerLoRAResolver",
    "adapter_read_config",
    "cache_root",
    "env_settings",
    "fetch_adapter",
    "is_remote",
    "is_tensorized_adapter_dir",
    "load_adapter_tensors",
    "lora_request_from_tensorizer_config",
    "prepare_lora_dir",
    "tensorize_lora_adapter",
]


def __getattr__(name):  # the resolver class needs vLLM; built on first use
    if name == "TensorizerLoRAResolver":
        from . import resolver

        return resolver.TensorizerLoRAResolver
    raise AttributeError(name)
