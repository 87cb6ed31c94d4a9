"""The plugin as vLLM sees it, without starting an engine: the entry point registers our
loaders (quietly), and a load through `TensorizerRsLoader.load_weights` shows vLLM's progress
bar and one INFO line. Runs against every vLLM the test setup installs (also the newer one)."""

from __future__ import annotations

import importlib.metadata
import logging

import pytest
import torch
from tensorizer_rs import TensorSerializer
from tensorizer_rs.vllm import PRE_PROCESSING_MARKER
from torch import nn

pytestmark = pytest.mark.vllm


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 32)
        self.register_buffer("buf", torch.arange(4.0))


@pytest.fixture
def vllm_file(tmp_path):
    """A file with vLLM module names (our marker) and the module it came from."""
    m = _Tiny()
    m.register_parameter(
        "vllm_tensorized_marker",
        nn.Parameter(torch.tensor([PRE_PROCESSING_MARKER]), requires_grad=False),
    )
    path = tmp_path / "model.tensors"
    with TensorSerializer(str(path)) as s:
        s.write_module(m)
    del m.vllm_tensorized_marker
    return path, m


@pytest.fixture
def loader_log():
    """Records of our loader's logger (vLLM's loggers need not propagate to the root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("vllm.tensorizer_rs")
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(handler)
    log.setLevel(old)


def test_entry_point_registers_our_loaders_quietly(tmp_path):
    from tensorizer_rs.vllm import plugin
    from tensorizer_rs.vllm.loader import TensorizerRsLoader, TensorizerRsSerializeLoader
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "tensorizer_rs.vllm.plugin:register" for ep in eps)

    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    vllm_log = logging.getLogger("vllm.model_executor.model_loader")
    vllm_log.addHandler(handler)
    try:
        plugin._registered = False  # as in a fresh process: register over vLLM's own loader
        plugin.register()
    finally:
        vllm_log.removeHandler(handler)
    assert not [r for r in warnings if "already registered" in r.getMessage()]

    cfg = {"tensorizer_uri": str(tmp_path / "model.tensors")}
    loader = get_model_loader(LoadConfig(load_format="tensorizer", model_loader_extra_config=cfg))
    assert type(loader) is TensorizerRsLoader
    serialize = get_model_loader(
        LoadConfig(
            load_format="tensorizer_rs_serialize",
            model_loader_extra_config={"tensorizer_config": cfg},
        )
    )
    assert type(serialize) is TensorizerRsSerializeLoader


class _ModelConfig:
    dtype = torch.float32


@pytest.mark.parametrize("use_tqdm", [True, False])
def test_load_shows_a_bar_and_one_info_line(vllm_file, loader_log, capsys, use_tqdm):
    from tensorizer_rs.vllm.loader import TensorizerRsLoader
    from vllm.config.load import LoadConfig

    path, source = vllm_file
    loader = TensorizerRsLoader(
        LoadConfig(
            load_format="tensorizer",
            model_loader_extra_config={"tensorizer_uri": str(path)},
            use_tqdm_on_load=use_tqdm,
        )
    )
    model = _Tiny()
    loader.load_weights(model, _ModelConfig())
    assert torch.equal(model.lin.weight, source.lin.weight)

    err = capsys.readouterr().err
    nbytes = sum(t.numel() * t.element_size() for t in source.state_dict().values()) + 8
    if use_tqdm:  # vLLM's format: one line per update, ending at 100 %
        assert "Loading tensorizer weights: 100% Completed" in err, err
    else:
        assert "Loading tensorizer weights" not in err, err
    lines = [r.getMessage() for r in loader_log if r.levelno == logging.INFO]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"tensorizer_rs: deserialized {nbytes} bytes")
    assert f"from {path} onto cpu" in lines[0] and "GB/s" in lines[0]
