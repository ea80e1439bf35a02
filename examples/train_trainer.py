"""Train a LoRA adapter with transformers' ``Trainer`` (adapter-only checkpoints, best model loaded at the end).

Runs offline in seconds on a CPU: a tiny Llama is built from a config (random weights) and a byte-level BPE
tokenizer is trained in memory on a toy corpus. The only peftkit-specific line is the trainer class:
``AdapterTrainer`` (= ``AdapterTrainerMixin`` + ``transformers.Trainer``) writes ``adapter_config.json`` +
``adapter_model.safetensors`` into every checkpoint instead of the full model, and resumes / loads the best
checkpoint into the adapter. A plain ``transformers.Trainer`` also trains the model, with full-model checkpoints.

    python examples/train_trainer.py [--out OUT_DIR] [--steps 40] [--resume CHECKPOINT_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a tiny model learns to say hello world",
    "low rank adapters train only a few parameters",
    "this movie was great and i loved it",
    "this movie was bad and i hated it",
    "hello world, hello adapters!",
]


def build_tokenizer(vocab_size: int = 128):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``CORPUS`` (``<pad>``=0, ``<eos>``=1, ``<unk>``=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(vocab_size: int = 128):
    """A tiny random ``LlamaForCausalLM`` (hidden 32, 2 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def build_dataset(tokenizer, length: int = 16):
    """Causal-LM rows: ``input_ids``/``attention_mask`` padded to ``length``, ``labels`` with -100 on padding."""
    from datasets import Dataset

    enc = tokenizer([t + tokenizer.eos_token for t in CORPUS], padding="max_length", truncation=True,
                    max_length=length)
    labels = [[i if m else -100 for i, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"],
                                                                                   enc["attention_mask"])]
    return Dataset.from_dict({**enc, "labels": labels})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resume", default=None, help="a checkpoint directory to resume from")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import TrainingArguments

    from peftkit import LoraConfig, PeftModel, get_peft_model
    from peftkit.integrations import AdapterTrainer

    out = args.out or tempfile.mkdtemp(prefix="peftkit-trainer-")
    tokenizer = build_tokenizer()
    model = get_peft_model(build_model(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    data = build_dataset(tokenizer)
    every = max(1, args.steps // 4)
    training_args = TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=3, learning_rate=2e-2,
        eval_strategy="steps", eval_steps=every, save_steps=every, logging_steps=every,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", save_total_limit=2,
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = AdapterTrainer(model=model, args=training_args, train_dataset=data, eval_dataset=data,
                             processing_class=tokenizer)
    first = trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=args.resume)
    last = trainer.evaluate()["eval_loss"]
    print(f"eval loss: {first:.4f} -> {last:.4f} (best checkpoint: {trainer.state.best_model_checkpoint})")

    final = os.path.join(out, "adapter")
    trainer.save_model(final)  # adapter_config.json + adapter_model.safetensors (+ tokenizer files)
    reloaded = PeftModel.from_pretrained(build_model(), final).eval()
    model.eval()
    batch = tokenizer(CORPUS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        same = torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-5)
    print(f"adapter saved to {final}; reloaded outputs match: {same}")
    summary = {"eval_loss_before": first, "eval_loss_after": last, "reloaded_matches": same,
               "best_checkpoint": trainer.state.best_model_checkpoint, "adapter_dir": final}
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
