"""vLLM model loaders backed by tensorizer_rs (registered by `tensorizer_rs.vllm.plugin`).

`TensorizerRsLoader` serves `load_format="tensorizer"`:

* files with `.vllm_tensorized_marker` (vLLM module names): the model is built, then
  `TensorDeserializer.load_into_module` fills the tensors the file provides straight on the
  target device (in place on CUDA where shape and dtype match; the others are released to meta
  first and replaced), then `process_weights_after_loading` runs when the weights were saved
  before it (our marker value, or `"process_weights_after_loading": true` in the extra config);
* other files (HF names): the model is built normally and fed `model.load_weights(...)` from a
  CPU `TensorDeserializer`, then post-processed like any vLLM load.

`TensorizerRsSerializeLoader` (`load_format="tensorizer_rs_serialize"`) loads a checkpoint with
vLLM's default loader and writes the vLLM module to a .tensors file before post-processing; it
is what `tensorize_vllm_model` runs in every worker.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Generator

import torch
from torch import nn
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import (
    initialize_model,
    process_weights_after_loading,
)

from .config import (
    INIT_FIELDS,
    MARKER_ATTR,
    MARKER_KEY,
    PRE_PROCESSING_MARKER,
    TensorizerConfig,
    _probe,
    is_valid_deserialization_uri,
    logger,
    validate_config,
)
from .fill import fill_module
from .serialize import serialize_vllm_model, tp_rank

#: Extra-config key (top level of --model-loader-extra-config) that forces or forbids
#: `process_weights_after_loading` for vLLM-tensorized files, whatever their marker says.
POST_PROCESS_KEY = "process_weights_after_loading"
#: Extra-config key of the serialize loader naming the load format that reads the source weights.
SOURCE_FORMAT_KEY = "source_load_format"

HF_LAYOUT, POST_PROCESSED, PRE_PROCESSING = "hf", "post-processed", "pre-processing"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def target_device(vllm_config) -> torch.device:
    """The device vLLM loads weights onto, with an explicit index for accelerators (our reader
    must not guess it; vLLM's built-in loader calls torch.accelerator even on CPU)."""
    load_device = vllm_config.load_config.device or vllm_config.device_config.device
    dev = torch.device(load_device)
    if dev.type not in ("cpu", "meta") and dev.index is None:
        acc = getattr(torch, "accelerator", None)
        if acc is not None and acc.is_available():
            dev = torch.device(dev.type, acc.current_device_index())
        elif dev.type == "cuda" and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _file_bytes(cfg: TensorizerConfig) -> int | None:
    """The bytes of tensor data in the file (its index only), for a progress bar's total."""
    from tensorizer_rs import TensorDeserializer

    args = cfg._construct_tensorizer_args()
    try:
        with TensorDeserializer(
            args.source(), device="cpu", lazy_load=True, **args.deserialization_kwargs
        ) as d:
            return d.total_file_bytes
    except Exception:  # noqa: BLE001 - the load itself reports what is wrong with the file
        return None


def _progress_bar(load_config, cfg: TensorizerConfig):
    """A tqdm bar in bytes as vLLM's own loaders show one: only with `use_tqdm_on_load` and on
    the first rank (vLLM's `enable_tqdm`), in vLLM's line-per-update format. None otherwise."""
    try:
        from vllm.model_executor.model_loader.weight_utils import _BAR_FORMAT, enable_tqdm
    except ImportError:  # a vLLM without them: no bar
        return None
    if not enable_tqdm(getattr(load_config, "use_tqdm_on_load", True)):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=_file_bytes(cfg),
        desc="Loading tensorizer weights",
        unit="B",
        unit_scale=True,
        bar_format=_BAR_FORMAT,
    )


def _log_load(uri: str, device, nbytes: int, secs: float, what: str) -> None:
    """The one INFO line of a load."""
    logger.info(
        "tensorizer_rs: deserialized %d bytes (%.3f GB) from %s onto %s in %.2f s, %.2f GB/s (%s)",
        nbytes,
        nbytes / 1e9,
        uri,
        device,
        secs,
        nbytes / 1e9 / max(secs, 1e-9),
        what,
    )


def config_from_extra(extra) -> tuple[TensorizerConfig, dict]:
    """Our TensorizerConfig from a LoadConfig's model_loader_extra_config (as vLLM's
    TensorizerLoader builds it), and the remaining top-level keys."""
    if hasattr(extra, "to_serializable"):  # a TensorizerConfig object (ours or vLLM's)
        return TensorizerConfig(**extra.to_serializable()), {}
    extra = dict(extra or {})
    validate_config(extra)
    cfg_dict = extra.get("tensorizer_config")
    if cfg_dict is None:  # a LoadConfig built by hand, not by EngineArgs
        cfg_dict = {k: v for k, v in extra.items() if k in INIT_FIELDS}
    unknown = set(cfg_dict) - INIT_FIELDS
    if unknown:  # e.g. `lora_dir` from vLLM <= 0.31
        logger.warning("Ignoring tensorizer_config keys this loader does not know: %s", unknown)
    cfg = TensorizerConfig(**{k: v for k, v in cfg_dict.items() if k in INIT_FIELDS})
    return cfg, extra


class TensorizerRsLoader(BaseModelLoader):
    """load_format="tensorizer" with tensorizer_rs (see the module docstring)."""

    def __init__(self, load_config):
        super().__init__(load_config)
        self.tensorizer_config, extra = config_from_extra(load_config.model_loader_extra_config)
        self.post_process_override = extra.get(POST_PROCESS_KEY)
        if self.post_process_override not in (None, True, False):
            raise ValueError(f"{POST_PROCESS_KEY} must be true, false or absent")
        self._probed: tuple[str, str, frozenset] | None = None  # (uri, layout, names)

    # ------------------------------------------------------------------ helpers
    def _config_for_this_rank(self) -> TensorizerConfig:
        # vLLM formats the template in place and only when TP > 1; we format a copy whenever the
        # URI is a template, so a TP=1 file written as "model-%03d.tensors" loads too.
        return self.tensorizer_config.for_rank(tp_rank())

    def _layout(self, cfg: TensorizerConfig) -> tuple[str, frozenset]:
        """(layout, tensor names) of the file, probed once per URI."""
        if self._probed is None or self._probed[0] != cfg.tensorizer_uri:
            self._probed = (cfg.tensorizer_uri, *self._probe_layout(cfg))
        return self._probed[1], self._probed[2]

    def _probe_layout(self, cfg: TensorizerConfig) -> tuple[str, frozenset]:
        keys, value = _probe(cfg, read_marker=self.post_process_override is None)
        if MARKER_KEY not in keys and not cfg.vllm_tensorized:
            return HF_LAYOUT, keys
        if cfg.vllm_tensorized:
            logger.warning(
                "Please note that newly serialized vLLM models are automatically "
                "inferred as vLLM models, so setting vllm_tensorized=True is "
                "only necessary for models serialized prior to this change."
            )
        if self.post_process_override is not None:
            pre = self.post_process_override
        else:
            pre = value == PRE_PROCESSING_MARKER
        return (PRE_PROCESSING if pre else POST_PROCESSED), keys

    def _weights_iterator(
        self, cfg: TensorizerConfig, loaded: list | None = None
    ) -> Generator[tuple[str, torch.Tensor]]:
        """The file's tensors (loaded to the CPU first), counting their bytes into `loaded`."""
        from tensorizer_rs import TensorDeserializer

        args = cfg._construct_tensorizer_args()
        bar = _progress_bar(self.load_config, cfg)
        try:
            with TensorDeserializer(
                args.source(), device="cpu", **args.deserialization_kwargs
            ) as state:
                for name, t in state.items():
                    n = t.numel() * t.element_size()
                    if loaded is not None:
                        loaded[0] += n
                    if bar is not None:
                        bar.update(n)
                    yield name, t
        finally:
            if bar is not None:
                bar.close()

    def _deserialize_into(
        self, model: nn.Module, cfg: TensorizerConfig, device, dtype, release=None
    ) -> tuple[int, float]:
        if not is_valid_deserialization_uri(cfg.tensorizer_uri):
            raise ValueError(
                f"{cfg.tensorizer_uri} is not a valid "
                f"tensorizer URI. Please check that the URI is correct. "
                f"It must either point to a local existing file, or have a "
                f"S3, HTTP or HTTPS scheme."
            )
        args = cfg._construct_tensorizer_args()
        kwargs = dict(args.deserialization_kwargs)
        bar = _progress_bar(self.load_config, cfg)
        if bar is not None:
            user = kwargs.get("progress")

            def progress(done: int, gbps: float) -> None:  # GPU loads report as they go
                bar.update(done - bar.n)
                if user is not None:
                    user(done, gbps)

            kwargs["progress"] = progress
        try:
            nbytes, secs = fill_module(model, args.source(), device, dtype, kwargs, release)
            if bar is not None:
                bar.update(nbytes - bar.n)  # CPU loads report at the end
        finally:
            if bar is not None:
                bar.close()
        if hasattr(model, MARKER_ATTR):
            delattr(model, MARKER_ATTR)
        return nbytes, secs

    # ------------------------------------------------------------------ BaseModelLoader API
    def download_model(self, model_config) -> None:
        self.tensorizer_config.verify_with_model_config(model_config)
        with self._config_for_this_rank().open_stream():
            pass

    def load_weights(self, model: nn.Module, model_config) -> None:
        """Load into an already-built model (vLLM's in-place API, also used by our load_model
        for HF-layout files). vLLM-tensorized files replace the module's tensors as they are."""
        cfg = self._config_for_this_rank()
        if self._layout(cfg)[0] == HF_LAYOUT:
            start, loaded = time.perf_counter(), [0]
            model.load_weights(self._weights_iterator(cfg, loaded))
            device = next(model.parameters()).device
            secs = time.perf_counter() - start
            _log_load(cfg.tensorizer_uri, device, loaded[0], secs, "HF names, model.load_weights")
        else:
            device = next(model.parameters()).device
            nbytes, secs = self._deserialize_into(model, cfg, device, model_config.dtype)
            _log_load(cfg.tensorizer_uri, device, nbytes, secs, "vLLM module, in place")

    def load_model(self, vllm_config, model_config, prefix: str = "") -> nn.Module:
        self.tensorizer_config.verify_with_model_config(model_config)
        self.tensorizer_config.verify_with_parallel_config(vllm_config.parallel_config)
        cfg = self._config_for_this_rank()
        layout, names = self._layout(cfg)
        if layout == HF_LAYOUT:
            # vLLM's standard path: build, load_weights (ours, above), post-process.
            return super().load_model(vllm_config, model_config, prefix)

        device = target_device(vllm_config)
        if device.type == "cuda":
            from tensorizer_rs import _cuda

            # Page-lock the staging buffers while vLLM builds the model, not after.
            readers = (cfg.deserialization_kwargs or {}).get("num_readers", cfg.num_readers)
            _cuda.prewarm_for(device, cfg.tensorizer_uri, readers)
        with _default_dtype(model_config.dtype):
            with torch.device(device):
                model = initialize_model(
                    vllm_config=vllm_config, model_config=model_config, prefix=prefix
                )
            nbytes, secs = self._deserialize_into(
                model, cfg, device, model_config.dtype, release=names
            )
            if layout == PRE_PROCESSING:
                with torch.no_grad():
                    process_weights_after_loading(model, model_config, device)
        what = "post-processed after loading" if layout == PRE_PROCESSING else "used as saved"
        _log_load(cfg.tensorizer_uri, device, nbytes, secs, f"{layout} vLLM module, {what}")
        return model.eval()


class TensorizerRsSerializeLoader(DefaultModelLoader):
    """Loads a checkpoint like `load_format=<source_load_format>` (default "auto") and writes the
    vLLM module, before `process_weights_after_loading`, to the `tensorizer_config` in the extra
    config (one file per TP rank). The engine then comes up as usual."""

    def __init__(self, load_config):
        extra = dict(load_config.model_loader_extra_config or {})
        self.tensorizer_config = TensorizerConfig(**extra.pop("tensorizer_config"))
        source_format = extra.pop(SOURCE_FORMAT_KEY, "auto")
        lc = copy.copy(load_config)
        lc.model_loader_extra_config = extra
        lc.load_format = source_format
        super().__init__(lc)

    def load_weights(self, model: nn.Module, model_config) -> None:
        super().load_weights(model, model_config)
        serialize_vllm_model(model, self.tensorizer_config, model_config)
