"""Deterministic sample tensors, importable both here and inside CoreWeave subprocesses."""

from __future__ import annotations

import torch

# Every dtype both CoreWeave 2.10.1 and 2.12.1 can write and read.
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def dtype_tensors(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, dt in enumerate(DTYPES):
        base = torch.randn(3, 5, generator=g) * 10
        if dt == torch.bool:
            t = base > 0
        elif dt.is_complex:
            t = torch.complex(base, -base).to(dt)
        else:
            t = base.to(dt)
        out[f"t_{str(dt).split('.')[-1]}"] = t
        out[f"s_{n}"] = t[0, 0].clone()  # 0-dim scalar
    out["noncontig"] = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    out["empty_f32"] = torch.zeros(0, 7)
    return out


def nested_state_dict() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "model": {
            "layers": [
                {"w": torch.randn(2, 2, generator=g)},
                {"w": torch.randn(3, generator=g), "b": torch.ones(1)},
            ]
        },
        "plain.dotted": torch.arange(5),
        "grid": [[torch.zeros(1, dtype=torch.int8)], [torch.ones(2, dtype=torch.uint8)]],
        "名前😀": torch.tensor([1.5]),
    }


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("step", torch.tensor([7]))
        self.register_buffer("scratch", torch.ones(2), persistent=False)


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.gate = torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))
        self.register_buffer("running", torch.randn(4))
        self.emb = torch.nn.Embedding(10, 4)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.norm = torch.nn.LayerNorm(4)
