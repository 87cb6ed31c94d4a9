"""vLLM integration for tensorizer_rs.

Installing tensorizer-rs registers a vLLM plugin (`tensorizer_rs.vllm.plugin:register`) that
serves `load_format="tensorizer"` with tensorizer_rs instead of CoreWeave's `tensorizer`.
This package also offers the vLLM-side helpers with vLLM's names:

    from tensorizer_rs.vllm import TensorizerConfig, tensorize_vllm_model, is_vllm_tensorized
    from tensorizer_rs.vllm import tensorize_lora_adapter, lora_request_from_tensorizer_config

`TensorizerConfig`, `is_vllm_tensorized`, `tensorize_lora_adapter` and `prepare_lora_dir` do not
import vLLM; `tensorize_vllm_model` and `lora_request_from_tensorizer_config` do (when called).
See docs/vllm.md.
"""

from .config import (
    BLACKLISTED_TENSORIZER_ARGS,
    MARKER_KEY,
    PRE_PROCESSING_MARKER,
    TensorizerArgs,
    TensorizerConfig,
    is_vllm_tensorized,
)
from .lora import lora_request_from_tensorizer_config, prepare_lora_dir, tensorize_lora_adapter

__all__ = [
    "BLACKLISTED_TENSORIZER_ARGS",
    "MARKER_KEY",
    "PRE_PROCESSING_MARKER",
    "TensorizerArgs",
    "TensorizerConfig",
    "is_vllm_tensorized",
    "lora_request_from_tensorizer_config",
    "prepare_lora_dir",
    "serialize_vllm_model",
    "tensorize_lora_adapter",
    "tensorize_vllm_model",
]


def __getattr__(name):  # the vLLM-importing helpers, on first use
    if name in ("tensorize_vllm_model", "serialize_vllm_model"):
        from . import serialize

        return getattr(serialize, name)
    raise AttributeError(name)
