"""Serialize and deserialize vLLM models with tensorizer_rs.

The same command line as vLLM's examples/features/tensorize_vllm_model.py, using tensorizer_rs
(no CoreWeave `tensorizer` needed). Serialize a model (HF id or local dir) into
`{dir}/vllm/{model}/{suffix}/model.tensors`, next to its config and tokenizer files:

    python examples/tensorize_vllm_model.py --model facebook/opt-125m \\
        serialize --serialized-directory s3://my-bucket --suffix v1 [--keyfile model.key]

With --tensor-parallel-size N, one file per rank: model-rank-%03d.tensors. --keyfile writes a
fresh random key there and encrypts the weights with it. S3 credentials come from
--s3-access-key-id/--s3-secret-access-key/--s3-endpoint or S3_ACCESS_KEY_ID,
S3_SECRET_ACCESS_KEY, S3_ENDPOINT_URL.

Load it back (this builds an `LLM`):

    python examples/tensorize_vllm_model.py --model facebook/opt-125m \\
        deserialize --path-to-tensors s3://my-bucket/vllm/facebook/opt-125m/v1/model.tensors

or serve it: `vllm serve <dir> --load-format tensorizer`.

With --lora-path PEFT_DIR_OR_HUB_ID (before the subcommand), `serialize` also writes the adapter
next to the model (`adapter_config.json`, `adapter_model.tensors`, encrypted with --keyfile's key),
and `deserialize` loads it with `enable_lora=True` and generates with it. Serve it with
`vllm serve <dir> --load-format tensorizer --enable-lora --lora-modules NAME=<dir>` (a key then
comes from TENSORIZER_RS_LORA_CONFIG; see docs/vllm.md, "LoRA adapters"). With tensorizer-rs installed, vLLM's
load_format="tensorizer" is served by tensorizer_rs (see docs/vllm.md).
"""

import argparse
import json
import logging
import os
import uuid

from tensorizer_rs.vllm import (
    TensorizerArgs,
    TensorizerConfig,
    lora_request_from_tensorizer_config,
    tensorize_lora_adapter,
    tensorize_vllm_model,
)
from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

logger = logging.getLogger()


def tensorizer_kwargs_arg(value):
    loaded = json.loads(value)
    if not isinstance(loaded, dict):
        raise argparse.ArgumentTypeError(
            f"Not deserializable to dict: {value}. serialization_kwargs and "
            f"deserialization_kwargs must be deserializable from a JSON string to a dictionary."
        )
    return loaded


def get_parser():
    parser = FlexibleArgumentParser(
        description="Serialize and deserialize vLLM models with tensorizer_rs, with optional "
        "encryption."
    )
    parser = EngineArgs.add_cli_args(parser)
    parser.add_argument(
        "--lora-path",
        type=str,
        required=False,
        help="Path to a PEFT LoRA adapter (local dir or hub id) to serialize alongside the "
        "model, or to load with it on deserialize.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    serialize_parser = subparsers.add_parser(
        "serialize", help="Serialize a model to `--serialized-directory`"
    )
    serialize_parser.add_argument(
        "--suffix",
        type=str,
        required=False,
        help="Appended to the output directory: `{dir}/vllm/{model}/{suffix}/model.tensors`. "
        "A random UUID if not given.",
    )
    serialize_parser.add_argument(
        "--serialized-directory",
        type=str,
        required=True,
        help="Local directory or S3 URI to serialize the model under.",
    )
    serialize_parser.add_argument(
        "--serialization-kwargs",
        type=tensorizer_kwargs_arg,
        required=False,
        help="JSON object of extra keyword arguments for TensorSerializer.",
    )
    serialize_parser.add_argument(
        "--keyfile",
        type=str,
        required=False,
        help="Encrypt the weights with a randomly generated key, saved at this path.",
    )

    deserialize_parser = subparsers.add_parser(
        "deserialize",
        help="Deserialize a model from `--path-to-tensors` to verify it can be loaded and used.",
    )
    deserialize_parser.add_argument(
        "--path-to-tensors",
        type=str,
        required=False,
        help="The local path or S3 URI of the model tensors to deserialize.",
    )
    deserialize_parser.add_argument(
        "--serialized-directory",
        type=str,
        required=False,
        help="Directory with model artifacts for loading; model.tensors is assumed to be in "
        "it. Can supersede --path-to-tensors.",
    )
    deserialize_parser.add_argument(
        "--keyfile",
        type=str,
        required=False,
        help="Path to the binary key to decrypt the weights with, if they were encrypted.",
    )
    deserialize_parser.add_argument(
        "--deserialization-kwargs",
        type=tensorizer_kwargs_arg,
        required=False,
        help="JSON object of extra keyword arguments for TensorDeserializer.",
    )
    TensorizerArgs.add_cli_args(deserialize_parser)
    return parser


def merge_extra_config_with_tensorizer_config(extra_cfg: dict, cfg: TensorizerConfig):
    for k, v in extra_cfg.items():
        if hasattr(cfg, k):
            setattr(cfg, k, v)
            logger.info(
                "Updating TensorizerConfig with %s from --model-loader-extra-config provided", k
            )


def deserialize(args, tensorizer_config):
    if not args.lora_path:
        return LLM(
            model=args.model,
            load_format="tensorizer",
            tensor_parallel_size=args.tensor_parallel_size,
            model_loader_extra_config=tensorizer_config,
        )
    llm = LLM(
        model=args.model,
        load_format="tensorizer",
        tensor_parallel_size=args.tensor_parallel_size,
        model_loader_extra_config=tensorizer_config,
        enable_lora=True,
        max_lora_rank=args.max_lora_rank,
    )
    # The adapter serialized next to the model, read with the same settings (key file, S3).
    lora_request = lora_request_from_tensorizer_config("lora", 1, tensorizer_config)
    params = SamplingParams(temperature=0, max_tokens=16)
    output = llm.generate(["Hello, my name is"], params, lora_request=lora_request)[0]
    print("LoRA output token ids:", list(output.outputs[0].token_ids))
    print("LoRA output:", output.outputs[0].text)
    return llm


def main():
    parser = get_parser()
    args = parser.parse_args()

    credentials = {
        "s3_access_key_id": getattr(args, "s3_access_key_id", None)
        or os.environ.get("S3_ACCESS_KEY_ID"),
        "s3_secret_access_key": getattr(args, "s3_secret_access_key", None)
        or os.environ.get("S3_SECRET_ACCESS_KEY"),
        "s3_endpoint": getattr(args, "s3_endpoint", None) or os.environ.get("S3_ENDPOINT_URL"),
    }
    model_ref = args.model
    keyfile = args.keyfile

    extra_config = args.model_loader_extra_config or {}
    if isinstance(extra_config, str):
        extra_config = json.loads(extra_config)

    tensorizer_dir = args.serialized_directory or extra_config.get("tensorizer_dir")
    tensorizer_uri = getattr(args, "path_to_tensors", None) or extra_config.get("tensorizer_uri")
    if tensorizer_dir and tensorizer_uri:
        parser.error("--serialized-directory and --path-to-tensors cannot both be provided")
    if not tensorizer_dir and not tensorizer_uri:
        parser.error("Either --serialized-directory or --path-to-tensors must be provided")

    if args.command == "serialize":
        engine_args = EngineArgs.from_cli_args(args)
        input_dir = tensorizer_dir.rstrip("/")
        suffix = args.suffix if args.suffix else uuid.uuid4().hex
        base_path = f"{input_dir}/vllm/{model_ref}/{suffix}"
        if engine_args.tensor_parallel_size > 1:
            model_path = f"{base_path}/model-rank-%03d.tensors"
        else:
            model_path = f"{base_path}/model.tensors"
        tensorizer_config = TensorizerConfig(
            tensorizer_uri=model_path,
            encryption_keyfile=keyfile,
            serialization_kwargs=args.serialization_kwargs or {},
            **credentials,
        )
        merge_extra_config_with_tensorizer_config(extra_config, tensorizer_config)
        tensorize_vllm_model(engine_args, tensorizer_config)
        if args.lora_path:
            # Next to model.tensors, encrypted with the same key when --keyfile is given.
            tensorize_lora_adapter(args.lora_path, tensorizer_config)
        # vLLM's layout, as its example makes it: {dir}/vllm/{--model as given}/{suffix}.
        print(
            f"Serialized to {base_path}; serve it with: vllm serve {base_path} --load-format tensorizer"
        )
    elif args.command == "deserialize":
        tensorizer_config = TensorizerConfig(
            tensorizer_uri=args.path_to_tensors,
            tensorizer_dir=args.serialized_directory,
            encryption_keyfile=keyfile or args.encryption_keyfile,
            deserialization_kwargs=args.deserialization_kwargs or {},
            verify_hash=args.verify_hash or None,
            num_readers=args.num_readers,
            **credentials,
        )
        merge_extra_config_with_tensorizer_config(extra_config, tensorizer_config)
        deserialize(args, tensorizer_config)
    else:
        raise ValueError("Either serialize or deserialize must be specified.")


if __name__ == "__main__":
    main()
