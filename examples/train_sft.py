"""Supervised fine-tuning of a LoRA adapter with TRL's ``SFTTrainer`` and peftkit.

Runs offline in seconds on a CPU (a tiny Llama built from a config, a BPE tokenizer trained in memory). The recipe
is one line: use ``peftkit.integrations.AdapterSFTTrainer`` where you would use ``trl.SFTTrainer``, and pass either
the ``PeftModel`` or the plain model with ``peft_config=peftkit.LoraConfig(...)``. It hands TRL the transformers
model with the adapters already in its layers (TRL's fused LM head patches that model), keeps ``trainer.model`` the
``PeftModel``, and writes adapter-only checkpoints (``adapter_config.json`` + ``adapter_model.safetensors``).

    python examples/train_sft.py [--out OUT_DIR] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_trainer import CORPUS, build_model, build_tokenizer  # the same tiny model and tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from datasets import Dataset
    from trl import SFTConfig

    from peftkit import LoraConfig, PeftModel
    from peftkit.integrations import AdapterSFTTrainer

    out = args.out or tempfile.mkdtemp(prefix="peftkit-sft-")
    tokenizer = build_tokenizer()
    config = SFTConfig(
        output_dir=out, max_steps=args.steps, max_length=32, per_device_train_batch_size=3, learning_rate=2e-2,
        save_steps=max(1, args.steps // 2), logging_steps=max(1, args.steps // 5), lr_scheduler_type="constant",
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = AdapterSFTTrainer(
        model=build_model(),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        args=config,
        train_dataset=Dataset.from_dict({"text": CORPUS * 2}),
        processing_class=tokenizer,
    )
    trainer.model.print_trainable_parameters()
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(f"training loss: {losses[0]:.4f} -> {losses[-1]:.4f}")

    final = os.path.join(out, "adapter")
    trainer.save_model(final)
    reloaded = PeftModel.from_pretrained(build_model(), final).eval()
    # with bf16 on (SFTConfig's default where supported) accelerate runs trainer.model's forward under autocast;
    # compare the transformers model inside it (its adapter layers hold the trained weights) in full precision
    trained = trainer.model.get_base_model().eval()
    batch = tokenizer(CORPUS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        same = torch.allclose(trained(**batch).logits, reloaded(**batch).logits, atol=1e-5)
    print(f"adapter saved to {final}; reloaded outputs match: {same}")
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump({"losses": losses, "reloaded_matches": same, "adapter_dir": final}, fh, indent=2)


if __name__ == "__main__":
    main()
