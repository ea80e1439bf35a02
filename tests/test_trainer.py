"""peftkit models in transformers' ``Trainer`` / ``Seq2SeqTrainer`` (transformers 5.23).

Properties (ECOSYSTEM.md §1):
- an unmodified ``Trainer`` finds the dataset columns and label names of the wrapped model (extra columns dropped,
  ``token_type_ids`` kept for BERT), reports ``eval_loss``, and its label smoothing on a causal LM equals the shifted
  computation (and differs from the unshifted one);
- ``AdapterTrainer`` checkpoints hold adapter files + trainer state and no full model; resuming from a checkpoint
  ends with the same adapter as the uninterrupted run (1e-6); ``load_best_model_at_end`` loads the best checkpoint's
  adapter (not the last one);
- gradient checkpointing (re-entrant) trains every adapter tensor, with the input-embedding hook installed;
- a tied-embedding model (GPT-2) saves with the unmodified Trainer and with the mixin;
- ``AdapterSeq2SeqTrainer`` on T5 gives adapter-only checkpoints and load-best;
- a plain model with injected adapters gets adapter-only checkpoints from the mixin;
- a quantized base passes Trainer's "purely quantized" check through the wrapper.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from example_scripts import run_example
from models import CASES_BY_NAME, VOCAB, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

from peftkit import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peftkit.integrations import AdapterSeq2SeqTrainer, AdapterTrainer, find_adapter_model
from peftkit.serialization.files import load_peft_weights

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

ATOL = 1e-6
ROWS, LEN = 16, 8


def _args(tmp_path, **overrides):
    base = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
        "learning_rate": 1e-2, "max_steps": 8, "save_steps": 4, "eval_steps": 4, "logging_steps": 4,
        "report_to": [], "use_cpu": True, "dataloader_num_workers": 0, "disable_tqdm": True, "seed": 0,
        "lr_scheduler_type": "constant",
    }
    base.update(overrides)
    return transformers.TrainingArguments(**base)


def _lm_dataset(extra: bool = False):
    ids = torch.randint(3, VOCAB, (ROWS, LEN), generator=torch.Generator().manual_seed(1))
    data = {"input_ids": ids.tolist(), "attention_mask": [[1] * LEN] * ROWS, "labels": ids.tolist()}
    if extra:
        data["junk"] = list(range(ROWS))
    return datasets.Dataset.from_dict(data)


def _llama_lora(**kwargs):
    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                   **kwargs))


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _assert_adapter_only(checkpoint: str) -> None:
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files, files
    assert any(f.startswith("rng_state") for f in files), files
    assert not any(f.startswith(("model.safetensors", "pytorch_model")) for f in files), files
    with open(os.path.join(checkpoint, "adapter_config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["peft_type"] == "LORA"


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], atol=ATOL, rtol=0, msg=key)


# ------------------------------------------------------------------------------------- unmodified Trainer
def test_unmodified_trainer_finds_columns_labels_and_reports_eval_loss(tmp_path):
    model = _llama_lora()
    ds = _lm_dataset(extra=True)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=ds,
                                   eval_dataset=ds)
    assert trainer.label_names == ["labels"]
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # "junk" dropped as for the wrapped model
    before = _adapter(model)
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] < trainer.state.log_history[0]["loss"]
    after = _adapter(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_unmodified_trainer_keeps_bert_token_type_ids(tmp_path):
    model = get_peft_model(tiny_bert("SEQ_CLS"), LoraConfig(r=2, task_type="SEQ_CLS"))
    ids = torch.randint(3, VOCAB, (4, LEN), generator=torch.Generator().manual_seed(2)).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": ids, "token_type_ids": [[0] * LEN] * 4, "label": [0, 1, 0, 1],
                                     "text": ["x"] * 4})
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=ds)
    assert trainer.label_names == ["labels"]
    assert set(next(iter(trainer.get_train_dataloader()))) == {"input_ids", "token_type_ids", "labels"}


def _smoothed(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LabelSmoother`` written out: (1 - eps) * NLL + eps * mean over the vocabulary."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum() / mask.sum()
    smooth = -logp.sum(-1)[mask].sum() / (mask.sum() * logp.shape[-1])
    return (1 - eps) * nll + eps * smooth


def test_label_smoothing_uses_shifted_labels_for_causal_lm(tmp_path):
    model = _llama_lora()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1),
                                   train_dataset=_lm_dataset())
    batch = {k: torch.tensor(v) for k, v in _lm_dataset()[:4].items()}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = trainer.compute_loss(model, dict(batch))
    shifted = _smoothed(logits[:, :-1], batch["labels"][:, 1:], 0.1)
    unshifted = _smoothed(logits, batch["labels"], 0.1)
    torch.testing.assert_close(loss, shifted, atol=1e-5, rtol=0)
    assert abs(float(shifted) - float(unshifted)) > 1e-3  # the check can tell the two apart


def test_gradient_checkpointing_trains_every_adapter_tensor(tmp_path):
    model = _llama_lora()
    args = _args(tmp_path, max_steps=2, save_strategy="no", activation_checkpointing=True,
                 activation_checkpointing_kwargs={"use_reentrant": True})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_lm_dataset())
    before = _adapter(model)
    trainer.train()
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert model.get_base_model()._require_grads_hooks  # input embeddings output tensors that require grad
    after = _adapter(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # A and B of every layer moved


def test_reentrant_checkpointing_reaches_adapters_of_a_non_token_input_model():
    """Whisper's input is ``input_features``, so transformers does not hook its input embeddings by itself; enabling
    checkpointing through the wrapper does (without it this backward raises: nothing requires grad)."""
    case = CASES_BY_NAME["whisper"]
    model = get_peft_model(case.build(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    model(**case.make_inputs(2)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}  # lora_A's grad is 0 while B is 0
    assert len(grads) == 12 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_tied_embeddings_save_with_unmodified_trainer_and_with_mixin(tmp_path):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, task_type="CAUSAL_LM"))
    assert model.get_base_model().lm_head.weight is model.get_base_model().transformer.wte.weight
    args = _args(tmp_path, max_steps=4, eval_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=_lm_dataset()).train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))  # the full model, tied matrix stored once
    fresh = get_peft_model(tiny_gpt2(), LoraConfig(r=2, task_type="CAUSAL_LM"))
    assert not fresh.load_state_dict(saved, strict=True).missing_keys
    _assert_same(_adapter(fresh), _adapter(model))

    args = _args(tmp_path, max_steps=4, eval_strategy="no", output_dir=str(tmp_path / "mixin"))
    AdapterTrainer(model=model, args=args, train_dataset=_lm_dataset()).train()
    _assert_adapter_only(str(tmp_path / "mixin" / "checkpoint-4"))


def test_quantized_base_passes_trainer_check_through_the_wrapper():
    from transformers.trainer_utils import validate_quantization_for_training

    base = tiny_llama()
    base.is_quantized = True  # what a bitsandbytes/torchao-loaded model reports
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(base)
    model = get_peft_model(base, LoraConfig(r=2, task_type="CAUSAL_LM"))
    validate_quantization_for_training(model)  # the wrapper carries transformers' "adapters attached" marker


# ------------------------------------------------------------------------------------- AdapterTrainer
def test_resume_gives_the_uninterrupted_adapter_and_checkpoints_are_adapter_only(tmp_path):
    full = _llama_lora()
    trainer = AdapterTrainer(model=full, args=_args(tmp_path / "a", eval_strategy="no"), train_dataset=_lm_dataset())
    trainer.train()
    expected = _adapter(full)
    for step in (4, 8):
        _assert_adapter_only(str(tmp_path / "a" / "out" / f"checkpoint-{step}"))
    saved = load_peft_weights(str(tmp_path / "a" / "out" / "checkpoint-8"))
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in saved)

    resumed = _llama_lora(init_lora_weights="gaussian")  # different start: resume must overwrite it
    trainer = AdapterTrainer(model=resumed, args=_args(tmp_path / "b", eval_strategy="no"),
                             train_dataset=_lm_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-4"))
    assert trainer.state.global_step == 8
    _assert_same(_adapter(resumed), expected)


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    model = _llama_lora()
    ds = _lm_dataset()
    # "best" = the highest eval loss, i.e. an early checkpoint while the loss falls, so it is not the last state
    args = _args(tmp_path, eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="eval_loss",
                 greater_is_better=True, save_total_limit=None)
    trainer = AdapterTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    last = str(tmp_path / "out" / "checkpoint-8")
    assert best is not None and os.path.basename(best) != "checkpoint-8"
    best_weights, last_weights = load_peft_weights(best), load_peft_weights(last)
    assert any(not torch.equal(best_weights[k], last_weights[k]) for k in best_weights)
    current = {k.replace(".default.", "."): v for k, v in _adapter(model).items()}
    _assert_same(current, best_weights)
    assert "eval_loss" in trainer.evaluate()


def test_seq2seq_trainer_on_t5_with_the_mixin(tmp_path):
    model = get_peft_model(tiny_t5(), LoraConfig(r=2, task_type="SEQ_2_SEQ_LM"))
    g = torch.Generator().manual_seed(3)
    src = torch.randint(3, VOCAB, (ROWS, LEN), generator=g).tolist()
    tgt = torch.randint(3, VOCAB, (ROWS, 6), generator=g).tolist()
    ds = datasets.Dataset.from_dict({"input_ids": src, "attention_mask": [[1] * LEN] * ROWS, "labels": tgt})
    args = transformers.Seq2SeqTrainingArguments(**{**_args(tmp_path).to_dict(), "eval_strategy": "steps",
                                                    "load_best_model_at_end": True})
    trainer = AdapterSeq2SeqTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds)
    before = _adapter(model)
    trainer.train()
    for step in (4, 8):
        _assert_adapter_only(str(tmp_path / "out" / f"checkpoint-{step}"))
    current = {k.replace(".default.", "."): v for k, v in _adapter(model).items()}
    _assert_same(current, load_peft_weights(trainer.state.best_model_checkpoint))
    assert any(not torch.equal(before[k], v) for k, v in _adapter(model).items())
    assert "eval_loss" in trainer.evaluate()


def test_mixin_saves_a_plain_model_with_injected_adapters(tmp_path):
    base = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), tiny_llama())
    assert find_adapter_model(base) is base
    base.requires_grad_(False)
    for name, param in base.named_parameters():
        param.requires_grad_("lora_" in name)
    trainer = AdapterTrainer(model=base, args=_args(tmp_path, max_steps=4, eval_strategy="no"),
                             train_dataset=_lm_dataset())
    trainer.train()
    checkpoint = str(tmp_path / "out" / "checkpoint-4")
    _assert_adapter_only(checkpoint)
    reloaded = PeftModel.from_pretrained(tiny_llama(), checkpoint)  # readable as a normal adapter
    current = {k.replace(".default.", "."): v for k, v in base.state_dict().items() if "lora_" in k}
    expected = {k.removeprefix("base_model.model.").replace(".default.", "."): v
                for k, v in _adapter(reloaded).items()}
    _assert_same(current, expected)


# ------------------------------------------------------------------------------------- example script


def test_example_train_trainer_runs(tmp_path):
    summary = run_example("train_trainer.py", tmp_path, steps=8)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    checkpoints = sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-"))
    assert checkpoints
    for name in checkpoints:
        _assert_adapter_only(str(tmp_path / name))
