"""Writing vLLM models with tensorizer_rs: `tensorize_vllm_model` and its pieces.

Unlike vLLM's built-in `tensorize_vllm_model` (which asks every worker, after start-up, to save
its *post-processed* module), ours starts the engine with `load_format="tensorizer_rs_serialize"`
so that each worker saves its module right after the checkpoint is read and *before*
`process_weights_after_loading`. Post-processed weights are backend specific (on CPU the linear
weights are packed into oneDNN handles and replaced by empty tensors), pre-processing ones load
on any device; our loader post-processes them after loading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from typing import Any

import torch
from torch import nn

from .config import (
    MARKER_ATTR,
    PRE_PROCESSING_MARKER,
    TensorizerConfig,
    logger,
    read_bytes,
    stream_kwargs_of,
)

SERIALIZE_FORMAT = "tensorizer_rs_serialize"

#: Top-level files of the model dir that are not copied next to model.tensors: vLLM's list
#: (weights, caches, docs), plus tensorizer files and the safetensors shard index.
ARTIFACT_IGNORE = (
    ".pt",
    ".safetensors",
    ".bin",
    ".cache",
    ".gitattributes",
    ".md",
    ".tensors",
    ".safetensors.index.json",
    ".pth",
)


def _is_remote(uri: str) -> bool:
    from tensorizer_rs import _native

    return _native.is_remote(uri)


def tp_rank() -> int:
    """This process's tensor-parallel rank (0 outside a distributed vLLM worker)."""
    from vllm.distributed import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0


def serialize_vllm_model(
    model: nn.Module, tensorizer_config: TensorizerConfig, model_config: Any = None
) -> str:
    """Write `model` (this rank's shard) with the pre-processing marker; returns the URI written.

    The marker is an int64 parameter `vllm_tensorized_marker` = PRE_PROCESSING_MARKER, stored
    with data (vLLM's is a meta tensor). Files stay readable by CoreWeave's tensorizer and
    loadable by vLLM's built-in loader, which only checks that the key exists.
    """
    from tensorizer_rs import EncryptionParams, TensorSerializer
    from tensorizer_rs._progress import bytes_callback, terminal_bar
    from tensorizer_rs.stream_io import open_stream

    if tensorizer_config.tensorizer_uri is None:
        raise ValueError("tensorizer_uri must be specified for serialization.")
    cfg = tensorizer_config.for_rank(tp_rank())
    stream_kwargs = stream_kwargs_of(cfg)
    encryption = None
    if cfg.encryption_keyfile is not None:
        encryption = EncryptionParams(key=read_bytes(cfg.encryption_keyfile, stream_kwargs))

    if any(v is not None for v in stream_kwargs.values()):
        dest = open_stream(cfg.tensorizer_uri, **{**stream_kwargs, "mode": "wb+"})
    else:
        dest = cfg.tensorizer_uri  # the writer opens it itself (parent dirs are created)
    model.register_parameter(
        MARKER_ATTR,
        nn.Parameter(torch.tensor([PRE_PROCESSING_MARKER], dtype=torch.int64), requires_grad=False),
    )
    total = sum(
        t.numel() * t.element_size()
        for m in model.modules()  # as write_module counts them: a shared tensor once per owner
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
    )
    try:
        # On a terminal, the first rank shows a bar (the others write at the same time).
        with terminal_bar(total, "Serializing", show=tp_rank() == 0) as bar:
            serializer = TensorSerializer(
                dest,
                encryption=encryption,
                progress=bytes_callback(bar),
                **cfg.serialization_kwargs,
            )
            serializer.write_module(model)
            serializer.close()
    finally:
        delattr(model, MARKER_ATTR)
    logger.info("Successfully serialized model to %s", cfg.tensorizer_uri)
    return cfg.tensorizer_uri


def write_keyfile(keyfile: str, tensorizer_config: TensorizerConfig) -> None:
    """A fresh random key at `keyfile` (local: created 0600; else through open_stream)."""
    from tensorizer_rs import EncryptionParams
    from tensorizer_rs.stream_io import open_stream

    key = EncryptionParams.random().key
    if _is_remote(keyfile):
        with open_stream(keyfile, **{**stream_kwargs_of(tensorizer_config), "mode": "wb+"}) as f:
            f.write(key)
        return
    os.makedirs(os.path.dirname(os.path.abspath(keyfile)), exist_ok=True)
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        f.write(key)


def serialize_extra_artifacts(
    tensorizer_config: TensorizerConfig, model: str, revision: str | None = None
) -> list[str]:
    """Copy the model's top-level config/tokenizer files to `tensorizer_dir`, so that
    `vllm serve <tensorizer_dir> --load-format tensorizer` finds them. `model` is a local dir or
    a hub id (fetched with huggingface_hub, which honours HF_HUB_OFFLINE)."""
    from tensorizer_rs.stream_io import open_stream

    with _model_files_dir(model, revision) as src:
        copied = []
        for entry in sorted(os.scandir(src), key=lambda e: e.name):
            if not entry.is_file() or entry.name.endswith(ARTIFACT_IGNORE):
                continue
            dest = f"{tensorizer_config.tensorizer_dir}/{entry.name}"
            kwargs = {**stream_kwargs_of(tensorizer_config), "mode": "wb+"}
            with open(entry.path, "rb") as f, open_stream(dest, **kwargs) as out:
                out.write(f.read())
            copied.append(entry.name)
    logger.info("Copied %s to %s", ", ".join(copied), tensorizer_config.tensorizer_dir)
    return copied


@contextlib.contextmanager
def _model_files_dir(model: str, revision: str | None):
    """A local directory with the model's files: the model dir itself, or a temporary snapshot
    of a hub repo without weights."""
    if os.path.isdir(model):
        yield model
        return
    from huggingface_hub import snapshot_download

    with tempfile.TemporaryDirectory() as tmp:
        snapshot_download(
            model,
            revision=revision,
            local_dir=tmp,
            ignore_patterns=[f"*{s}" for s in ARTIFACT_IGNORE],
        )
        yield tmp


def _shutdown(engine) -> None:
    """Stop an LLMEngine's helpers (vLLM >= 0.32 has renderer + engine_core)."""
    error = None
    for name in ("renderer", "engine_core"):
        fn = getattr(getattr(engine, name, None), "shutdown", None)
        if fn is None:
            continue
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - keep going; report the first failure
            logger.exception("Failed to shut down tensorization %s", name)
            error = error or e
    if error is not None:
        raise error


def tensorize_vllm_model(
    engine_args, tensorizer_config: TensorizerConfig, generate_keyfile: bool = True
) -> None:
    """Load a model with vLLM and serialize it with tensorizer_rs, like vLLM's function of the
    same name: one file per tensor-parallel rank (`tensorizer_uri` must then contain `%0Nd`),
    encrypted when `encryption_keyfile` is set (a fresh key is written there first when
    `generate_keyfile`, shared by all ranks), plus the model's config and tokenizer files copied
    to `tensorizer_dir` (local or s3://).

    The weights are saved before vLLM's post-processing (see the module docstring).
    """
    from vllm.v1.engine.llm_engine import LLMEngine

    from .loader import SOURCE_FORMAT_KEY

    if not isinstance(tensorizer_config, TensorizerConfig):  # e.g. vLLM's own class
        tensorizer_config = TensorizerConfig(**tensorizer_config.to_serializable())
    source_extra = engine_args.model_loader_extra_config
    if hasattr(source_extra, "to_serializable"):
        source_extra = {}
    source_extra = {
        k: v
        for k, v in dict(source_extra or {}).items()
        if k not in TensorizerConfig._keys and k != "tensorizer_config"
    }
    source_format = engine_args.load_format
    if source_format in ("tensorizer", SERIALIZE_FORMAT):
        source_format = "auto"
    engine_args = dataclasses.replace(
        engine_args,
        load_format=SERIALIZE_FORMAT,
        model_loader_extra_config={
            **source_extra,
            SOURCE_FORMAT_KEY: source_format,
            "tensorizer_config": tensorizer_config.to_serializable(),
        },
    )
    engine_config = engine_args.create_engine_config()
    tensorizer_config.verify_with_model_config(engine_config.model_config)
    tensorizer_config.verify_with_parallel_config(engine_config.parallel_config)

    # Before the engine starts, so that every shard is encrypted with the same key.
    if generate_keyfile and tensorizer_config.encryption_keyfile is not None:
        write_keyfile(tensorizer_config.encryption_keyfile, tensorizer_config)

    engine = LLMEngine.from_vllm_config(engine_config)  # workers serialize while loading
    _shutdown(engine)
    del engine

    tp = engine_config.parallel_config.tensor_parallel_size
    uris = [tensorizer_config.for_rank(r).tensorizer_uri for r in range(tp)]
    missing = [u for u in uris if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise RuntimeError(f"Serialization did not produce {missing}")

    model_config = engine_config.model_config
    try:
        serialize_extra_artifacts(tensorizer_config, model_config.model, model_config.revision)
    except Exception as e:  # noqa: BLE001 - model.tensors is written; configs are a convenience
        logger.warning(
            "Serialized %s, but could not copy the config/tokenizer files of %s to %s: %s",
            uris,
            model_config.model,
            tensorizer_config.tensorizer_dir,
            e,
        )
    logger.info("Successfully serialized model to %s", ", ".join(uris))
