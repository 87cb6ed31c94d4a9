"""A tiny random PEFT LoRA for the tiny test Llama (examples/make_tiny_model.py), saved twice:
OUT/st (adapter_model.safetensors) and OUT/bin (adapter_model.bin), same tensors.

    python make_tiny_lora.py MODEL_DIR OUT

PEFT initialises lora_B to zeros (the adapter would change nothing); here every lora_B is seeded
random, so the adapter changes the model's output.
"""

import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    model_dir, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(os.path.join(out, "st"), safe_serialization=True)
    peft_model.save_pretrained(os.path.join(out, "bin"), safe_serialization=False)
    print("saved", {d: sorted(os.listdir(os.path.join(out, d))) for d in ("st", "bin")})


if __name__ == "__main__":
    main()
