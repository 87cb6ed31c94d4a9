"""Writes vLLM-tensorized files of a model with CoreWeave's real `tensorizer` (on PYTHONPATH).

    python coreweave_write.py MODEL_DIR OUT_DIR

Runs an in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) whose loader, right after the
checkpoint is read (before post-processing), writes:

* OUT_DIR/vllm-builtin/model.tensors: vLLM's own serialize_vllm_model (meta marker, i.e. vLLM's
  convention for post-processed weights; here they are not post-processed, as on CPU they must
  not be);
* OUT_DIR/pre-marker/model.tensors: TensorSerializer.write_module with our pre-processing
  marker value (written with data);
* OUT_DIR/encrypted/model.tensors (+ model.key): the same, encrypted with a random key.
"""

import os
import sys


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    import tensorizer
    import torch
    from tensorizer import EncryptionParams, TensorSerializer
    from tensorizer_rs.vllm import PRE_PROCESSING_MARKER
    from vllm import LLM
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader import tensorizer as vllm_tz
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    assert "tensorizer_rs" not in tensorizer.__file__, tensorizer.__file__
    # vLLM 0.32 passes a local dir to snapshot_download here (HFValidationError); upstream's
    # tests no-op it the same way.
    vllm_tz.serialize_extra_artifacts = lambda *a, **k: None

    @register_model_loader("coreweave_write")
    class CoreWeaveWrite(DefaultModelLoader):
        def __init__(self, load_config):
            load_config.model_loader_extra_config = {}
            load_config.load_format = "auto"
            super().__init__(load_config)

        def load_weights(self, model, model_config):
            super().load_weights(model, model_config)
            cfg = vllm_tz.TensorizerConfig(tensorizer_uri=f"{out}/vllm-builtin/model.tensors")
            vllm_tz.serialize_vllm_model(model, cfg, model_config)
            del model.vllm_tensorized_marker
            model.register_parameter(
                "vllm_tensorized_marker",
                torch.nn.Parameter(torch.tensor([PRE_PROCESSING_MARKER]), requires_grad=False),
            )
            key = EncryptionParams.random()
            for sub, enc in (("pre-marker", None), ("encrypted", key)):
                os.makedirs(f"{out}/{sub}", exist_ok=True)
                s = TensorSerializer(f"{out}/{sub}/model.tensors", encryption=enc)
                s.write_module(model)
                s.close()
            with open(f"{out}/encrypted/model.key", "wb") as f:
                f.write(key.key)
            del model.vllm_tensorized_marker

    LLM(
        model=model_dir,
        load_format="coreweave_write",
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=4,
    )
    print("COREWEAVE_WRITTEN", tensorizer.__version__, sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
