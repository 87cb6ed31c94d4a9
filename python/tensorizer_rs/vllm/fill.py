"""The part of the vLLM loader that needs no vLLM: release the tensors a file provides to the
meta device, fill them from the file on the target device, check nothing is left on meta.

Kept free of vLLM imports so that the same code path runs (and is timed) where vLLM cannot be
installed, e.g. on the GPU machine (bench/gpu_bench.py, case "vllm_path")."""

from __future__ import annotations

import time

import torch
from torch import nn


def release_file_tensors(model: nn.Module, names: frozenset, keep=None) -> None:
    """Swap every parameter and buffer that the file provides for a meta tensor, so the memory
    the constructor allocated is free before the reader allocates the loaded copies. Tensors for
    which ``keep(name, tensor)`` is true stay: the reader fills those in place (see
    `fill_module`), with no second allocation.

    This is the meta-device init of vLLM's loader, done afterwards: vLLM's MetaTensorMode only
    redirects `aten::empty` calls without a `device` kwarg, and with torch 2.13 the kwarg is
    always present, so vLLM 0.32 really builds the model on the target device. Sending every
    allocation to meta instead (torch.device("meta")) would also hit tensors that are not
    parameters or buffers (workspaces, values computed at init), which the file cannot restore.
    Parameters
    the file lacks would stay uninitialised, so they are an error, as a leftover meta tensor is
    in vLLM; buffers the file lacks keep the value the constructor computed.
    """
    missing, released = [], 0
    for mod_name, module in model.named_modules():
        for attr, t in list(module._parameters.items()):
            name = f"{mod_name}.{attr}"
            if t is None:
                continue
            if name not in names:
                missing.append(name.lstrip("."))
            elif t.device.type != "meta" and (keep is None or not keep(name, t)):
                module._parameters[attr] = nn.Parameter(
                    torch.empty_like(t, device="meta"), requires_grad=False
                )
                released += 1
        for attr, t in list(module._buffers.items()):
            name = f"{mod_name}.{attr}"
            if t is None or t.device.type == "meta" or name not in names:
                continue
            if keep is None or not keep(name, t):
                module._buffers[attr] = torch.empty_like(t, device="meta")
                released += 1
    if missing:
        raise ValueError(
            "The serialized model lacks parameters of the model being loaded, which would"
            " stay uninitialised. Please check that the parameters of the model being"
            " specified match that of the serialized model, such as its quantization."
            f" Missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    acc = getattr(torch, "accelerator", None)
    if released and acc is not None and acc.is_available():
        acc.empty_cache()


def check_no_meta_tensors(model: nn.Module) -> None:
    left = [name for name, t in model.state_dict().items() if t.device.type == "meta"]
    if left:
        raise ValueError(
            "The serialized model contains tensors on the meta device,"
            " indicating that some tensors were not loaded properly."
            " Please check that the parameters of the model being"
            " specified match that of the serialized model, such as"
            f" its quantization. Not loaded: {left[:8]}{' ...' if len(left) > 8 else ''}"
        )


def fill_module(
    model: nn.Module,
    source,
    device,
    dtype,
    deserialization_kwargs: dict,
    release: frozenset | None = None,
):
    """Load `source` into `model` on `device`; returns (bytes, seconds). Leaves parameters
    without grad.

    With `release` (the file's tensor names), the model's tensors are first checked against the
    file: those the reader fills in place stay (`TensorDeserializer.fills_in_place`: on a CUDA
    device, the file's shape and the loaded dtype; no release, no second allocation: the
    fastest path, docs/vllm.md); the rest are released to meta (`release_file_tensors`) and
    loaded as new tensors."""
    from tensorizer_rs import TensorDeserializer

    start = time.perf_counter()
    with TensorDeserializer(
        source, device=str(device), dtype=dtype, **deserialization_kwargs
    ) as deserializer:
        if release is not None:
            release_file_tensors(model, release, keep=deserializer.fills_in_place)
        deserializer.load_into_module(model)
        nbytes = deserializer.total_tensor_bytes
    secs = time.perf_counter() - start
    check_no_meta_tensors(model)
    # The reader hands back Parameters with requires_grad=True for float tensors (as
    # tensorizer does); vLLM's kernels and in-place updates (e.g. _k_scale.fill_) need False.
    for p in model.parameters():
        p.requires_grad_(False)
    return nbytes, secs
