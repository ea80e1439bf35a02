"""peftkit quick start: wrap a tiny Llama with LoRA, train a few steps, save, reload, check the outputs match.

Runs offline in a few seconds on a CPU: the base model is built from a config (random weights) and saved to a
local directory, so ``AutoPeftModelForCausalLM`` can load "the base named in the adapter config" from disk.

    python examples/quickstart.py [--out OUT_DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch


def build_base(path: str) -> None:
    """Save a tiny random Llama (hidden 64, 2 layers, vocab 256) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(path)


def toy_data(batch: int = 8, length: int = 16) -> torch.Tensor:
    """A small fixed set of token sequences for the adapter to memorise: ``(batch, length)`` ids."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (batch, length), generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where to write the base model and the adapter (default: tmp)")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoModelForCausalLM

    from peftkit import AutoPeftModelForCausalLM, LoraConfig, TaskType, get_peft_model

    out = args.out or tempfile.mkdtemp(prefix="peftkit-quickstart-")
    base_dir, adapter_dir = os.path.join(out, "base"), os.path.join(out, "adapter")
    build_base(base_dir)

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32))
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = toy_data()
    losses = []
    for step in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    if not losses[-1] < losses[0]:
        raise SystemExit("training did not reduce the loss")
    model.save_pretrained(adapter_dir)
    print("saved:", sorted(os.listdir(adapter_dir)),
          f"({os.path.getsize(os.path.join(adapter_dir, 'adapter_model.safetensors')):,d} bytes of weights)")

    probe = ids[:2]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=probe).logits
        reloaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
        after = reloaded(input_ids=probe).logits
    diff = (before - after).abs().max().item()
    print(f"reloaded from {adapter_dir}: max |logits difference| = {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit("the reloaded adapter does not reproduce the trained model's outputs")
    print("OK: the reloaded adapter reproduces the trained model.")


if __name__ == "__main__":
    main()
