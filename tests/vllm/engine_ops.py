"""Runs a list of vLLM operations in one process and prints one `OP_RESULT {json}` line each
(`{"op", "name", ...result}`; an op may carry a "name" to find its result by).

    python engine_ops.py '<json list of ops>'

Used by tests/vllm (always in a subprocess: vLLM engines and their globals stay out of pytest).
With VLLM_ENABLE_V1_MULTIPROCESSING=0 and TP=1 the engine runs in this process, so one import of
vLLM serves many loads (~3 s each instead of ~30 s). Ops (keys besides "op" are arguments):

* generate: model, load_format="auto", extra={} (model_loader_extra_config), tp=1,
  extra_as_config=False (pass `TensorizerConfig(**extra)`, our class, instead of the dict),
  prompts=None (lists of token ids instead of PROMPTS)
    -> {"tokens": [[...], [...]], "text": [...]} greedy tokens of PROMPTS (and their text, as
    the model's tokenizer decodes them), or {"error_type", "error"}
* tensorize: model, config (TensorizerConfig kwargs), tp=1, generate_keyfile=True
    -> tensorize_vllm_model(EngineArgs(model, ...), TensorizerConfig(**config))
* write_hf: model (a safetensors dir), uri -> TensorSerializer.write_state_dict(HF weights)
* lora: model, adapters (list of {"name", "path"} or {"name", "tensorizer_config"}: a vLLM
  <= 0.31 config dict for lora_request_from_tensorizer_config), load_format="auto", extra={}
    -> {"base": tokens, "<name>": {"tokens"} or {"error_type", "error"}, ..., "base_after": tokens}
  with LLM(enable_lora=True). Each adapter is first loaded with llm_engine.add_lora (a failure
  is reported, not scheduled), then used in LLM.generate(lora_request=...).
* env: values={name: value}, unset=[names] -> changes os.environ for the ops after it (e.g. the
  S3_* credentials vLLM users set; the engine runs in this process)

Every result also has "seconds" (the op's wall time). Any op that raises reports
{"error_type", "error"} (the traceback goes to stderr) and the next op still runs.
"""

import gc
import json
import sys
import time
import traceback

PROMPTS = [{"prompt_token_ids": [1, 10, 20, 30, 40]}, {"prompt_token_ids": [1, 500, 600]}]
ENGINE_KW = {
    "dtype": "bfloat16",
    "enforce_eager": True,
    "max_model_len": 256,
    "max_num_seqs": 4,
    "seed": 0,
}


def op_generate(model, load_format="auto", extra=None, tp=1, extra_as_config=False, prompts=None):
    from vllm import LLM, SamplingParams

    extra = dict(extra or {})  # EngineArgs edits it in place
    if extra_as_config:
        from tensorizer_rs.vllm import TensorizerConfig

        extra = TensorizerConfig(**extra)
    llm = LLM(
        model=model,
        load_format=load_format,
        tensor_parallel_size=tp,
        model_loader_extra_config=extra,
        **ENGINE_KW,
    )
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        if prompts is not None:
            prompts = [{"prompt_token_ids": ids} for ids in prompts]
        outs = llm.generate(prompts or PROMPTS, sp, use_tqdm=False)
        return {
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "text": [o.outputs[0].text for o in outs],
        }
    finally:
        del llm
        gc.collect()


def op_lora(model, adapters, load_format="auto", extra=None, max_lora_rank=8):
    from tensorizer_rs.vllm import lora_request_from_tensorizer_config
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=model,
        load_format=load_format,
        model_loader_extra_config=dict(extra or {}),
        enable_lora=True,
        max_lora_rank=max_lora_rank,
        **ENGINE_KW,
    )
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def tokens(lora_request=None):
        outs = engine[0].generate(PROMPTS, sp, use_tqdm=False, lora_request=lora_request)
        return [list(o.outputs[0].token_ids) for o in outs]

    engine = [llm]
    result = {"base": tokens()}
    try:
        for i, a in enumerate(adapters, start=1):
            try:
                if "tensorizer_config" in a:
                    req = lora_request_from_tensorizer_config(a["name"], i, a["tensorizer_config"])
                else:
                    req = LoRARequest(a["name"], i, a["path"])
                engine[0].llm_engine.add_lora(req)
                result[a["name"]] = {"tokens": tokens(req), "path": req.lora_path}
            except Exception as e:  # noqa: BLE001 - reported to the test
                traceback.print_exc()
                result[a["name"]] = {"error_type": type(e).__name__, "error": str(e)}
        result["base_after"] = tokens()
        return result
    finally:
        del llm, engine[:]
        gc.collect()


def op_tensorize(model, config, tp=1, generate_keyfile=True):
    from tensorizer_rs.vllm import TensorizerConfig, tensorize_vllm_model
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=model, tensor_parallel_size=tp, **ENGINE_KW)
    tensorize_vllm_model(args, TensorizerConfig(**config), generate_keyfile=generate_keyfile)
    return {}


def op_write_hf(model, uri):
    import glob

    from safetensors.torch import load_file
    from tensorizer_rs import TensorSerializer

    state = {}
    for f in sorted(glob.glob(f"{model}/*.safetensors")):
        state.update(load_file(f))
    s = TensorSerializer(uri)
    s.write_state_dict(state)
    s.close()
    return {"tensors": len(state)}


def op_env(values=None, unset=()):
    import os

    os.environ.update(values or {})
    for name in unset:
        os.environ.pop(name, None)
    return {}


def main():
    ops = json.loads(sys.argv[1])
    for op in ops:
        kind = op.pop("op")
        name = op.pop("name", kind)
        start = time.perf_counter()
        try:
            result = globals()[f"op_{kind}"](**op)
        except Exception as e:  # noqa: BLE001 - reported to the test
            traceback.print_exc()
            result = {"error_type": type(e).__name__, "error": str(e)}
            # leave a clean slate for the next op after a failed engine start
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        result["seconds"] = round(time.perf_counter() - start, 2)
        print("OP_RESULT " + json.dumps({"op": kind, "name": name, **result}), flush=True)


if __name__ == "__main__":
    main()
