"""Round-trip a small torch module through tensorizer_rs, CoreWeave's tensorizer API in Rust.

Run with `bash scripts/demo.sh`, or `python examples/demo.py` where tensorizer_rs is installed.
"""

import os
import tempfile
import time

import torch
from tensorizer_rs import TensorDeserializer, TensorSerializer


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.BatchNorm1d(256),  # buffers, including an int64 one (num_batches_tracked)
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    model(torch.randn(8, 64))  # one training-mode step: non-trivial running stats
    return model.eval()


def main() -> None:
    original = make_model(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tensors")

        t0 = time.perf_counter()
        serializer = TensorSerializer(path)
        serializer.write_module(original)
        serializer.close()
        t1 = time.perf_counter()

        deserializer = TensorDeserializer(path, device="cpu")
        expected = original.state_dict()
        assert sorted(deserializer.keys()) == sorted(expected), "tensor names differ"
        for name, tensor in deserializer.items():
            assert tensor.dtype == expected[name].dtype, name
            assert torch.equal(tensor, expected[name]), name

        restored = make_model(seed=1)  # different weights until loaded
        deserializer.load_into_module(restored)
        t2 = time.perf_counter()

        x = torch.randn(4, 64)
        assert torch.equal(original(x), restored(x)), "outputs differ after load_into_module"
        print(
            f"OK: {len(expected)} tensors, {os.path.getsize(path)} bytes in {path!r}; "
            f"write {1e3 * (t1 - t0):.1f} ms, read+load {1e3 * (t2 - t1):.1f} ms; "
            "loaded module gives identical outputs"
        )


if __name__ == "__main__":
    main()
