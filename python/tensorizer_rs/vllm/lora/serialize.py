"""Writing a PEFT adapter as a tensorized one (`tensorize_lora_adapter`)."""

from __future__ import annotations

import os
from typing import Any

from ..config import logger, read_bytes, stream_kwargs_of
from .settings import ADAPTER_CONFIG, ADAPTER_TENSORS, _as_config


def _local_adapter_source(lora_path: str) -> str:
    """A local dir with the adapter: `lora_path` itself, or a hub id's snapshot (fetched with
    huggingface_hub, which uses only its cache when HF_HUB_OFFLINE=1)."""
    expanded = os.path.expanduser(lora_path)
    if os.path.isdir(expanded):
        return expanded
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id=lora_path, allow_patterns=[ADAPTER_CONFIG, "adapter_model.*"]
        )
    except Exception as e:  # one message for "no such dir", "no such hub repo", offline
        raise ValueError(
            f"{lora_path} is neither a local directory nor a Hugging Face hub adapter that "
            f"could be fetched or found in the local cache: {e}"
        ) from e


def tensorize_lora_adapter(lora_path: str, tensorizer_config: Any) -> None:
    """Write the PEFT adapter at `lora_path` (a local dir, or a hub id; with `adapter_config.json`
    and `adapter_model.safetensors` or `.bin`) as `adapter_config.json` (copied as is) and
    `adapter_model.tensors` into `tensorizer_config.tensorizer_dir` (or the <= 0.31 attribute
    `lora_dir` when set), local or `s3://`, as vLLM <= 0.31's function did. With
    `encryption_keyfile` set (an existing key, e.g. the model's) the tensors are encrypted
    with it; `serialization_kwargs` go to `TensorSerializer`."""
    from tensorizer_rs import EncryptionParams, TensorSerializer
    from tensorizer_rs._progress import bytes_callback, terminal_bar
    from tensorizer_rs.stream_io import open_stream

    cfg, lora_dir = _as_config(tensorizer_config)
    out_dir = (lora_dir or cfg.tensorizer_dir).rstrip("/")
    src = _local_adapter_source(lora_path)
    config_path = os.path.join(src, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise ValueError(f"{src} has no {ADAPTER_CONFIG}")
    weights = [n for n in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = [os.path.join(src, n) for n in weights if os.path.isfile(os.path.join(src, n))]
    if not weights:
        raise ValueError(
            f"{src} has neither adapter_model.safetensors nor adapter_model.bin; "
            "only those formats are supported"
        )
    if weights[0].endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(weights[0], device="cpu")
    else:
        import torch

        tensors = torch.load(weights[0], map_location="cpu", weights_only=True)

    stream_kwargs = stream_kwargs_of(cfg)
    write_kwargs = {**stream_kwargs, "mode": "wb+"}
    with (
        open(config_path, "rb") as f,
        open_stream(f"{out_dir}/{ADAPTER_CONFIG}", **write_kwargs) as o,
    ):
        o.write(f.read())
    encryption = None
    if cfg.encryption_keyfile:
        encryption = EncryptionParams(key=read_bytes(cfg.encryption_keyfile, stream_kwargs))
    dest: Any = f"{out_dir}/{ADAPTER_TENSORS}"
    if any(v is not None for v in stream_kwargs.values()):
        dest = open_stream(dest, **write_kwargs)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with terminal_bar(total, f"Serializing {ADAPTER_TENSORS}") as bar:
        serializer = TensorSerializer(
            dest, encryption=encryption, progress=bytes_callback(bar), **cfg.serialization_kwargs
        )
        serializer.write_state_dict(tensors)
        serializer.close()
    logger.info(
        "Successfully serialized LoRA adapter %s to %s/%s%s",
        lora_path,
        out_dir,
        ADAPTER_TENSORS,
        " (encrypted)" if encryption is not None else "",
    )
