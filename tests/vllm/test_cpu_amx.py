"""vLLM 0.32's CPU backend on AMX machines: a process whose first forward pass has 4 tokens or
fewer died with SIGILL (the attention kernel runs AMX `tilezero` without Linux's per-process
AMX permission; larger first batches went through a oneDNN matmul that asked for it). The plugin
requests the permission (tensorizer_rs.vllm.plugin._request_amx_permission)."""

from __future__ import annotations

import pytest
import torch
from vllm_helpers import make_tiny_model, run_ops

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.skipif(
    not getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)(),
    reason="the CPU has no AMX",
)
def test_first_forward_pass_with_four_tokens(tmp_path):
    model = make_tiny_model(tmp_path / "tiny-llama")
    r = run_ops(
        [{"op": "generate", "name": "short", "model": str(model), "prompts": [[10, 20, 30, 40]]}]
    )
    assert len(r["short"].get("tokens", [[]])[0]) == 8, r["short"]
