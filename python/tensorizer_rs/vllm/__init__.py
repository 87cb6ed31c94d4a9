"""vLLM integration for tensorizer_rs.

Installing tensorizer-rs registers a vLLM plugin (`tensorizer_rs.vllm.plugin:register`) that
serves `load_format="tensorizer"` with tensorizer_rs instead of CoreWeave's `tensorizer`.
This package also offers the vLLM-side helpers with vLLM's names:

    from tensorizer_rs.vllm import TensorizerConfig, tensorize_vllm_model, is_vllm_tensorized

`TensorizerConfig` and `is_vllm_tensorized` do not import vLLM; `tensorize_vllm_model` does.
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

__all__ = [
    "BLACKLISTED_TENSORIZER_ARGS",
    "MARKER_KEY",
    "PRE_PROCESSING_MARKER",
    "TensorizerArgs",
    "TensorizerConfig",
    "is_vllm_tensorized",
    "serialize_vllm_model",
    "tensorize_vllm_model",
]


def __getattr__(name):  # the vLLM-importing helpers, on first use
    if name in ("tensorize_vllm_model", "serialize_vllm_model"):
        from . import serialize

        return getattr(serialize, name)
    raise AttributeError(name)
