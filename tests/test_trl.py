"""peftkit models in TRL's ``SFTTrainer`` (trl 1.16) through ``AdapterSFTTrainer`` (ECOSYSTEM.md §3).

Properties:
- ``AdapterSFTTrainer(model=peft_model)`` trains a tiny Llama: the loss falls, only adapter tensors change, TRL's
  fused LM head is installed on the transformers model (not on the wrapper) and used (its metrics are logged),
  ``trainer.model`` is the ``PeftModel``, checkpoints are adapter-only and resuming gives the uninterrupted adapter;
- ``peft_config=<peftkit LoraConfig>`` with a plain model wraps it first (TRL alone raises ``TypeError``);
- a prompt-learning adapter is refused with a ConfigError naming the reason.
"""

from __future__ import annotations

import os

import pytest
import torch
from example_scripts import run_example
from models import tiny_llama, tiny_tokenizer

from peftkit import ConfigError, LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from peftkit.integrations import AdapterSFTTrainer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello adapters!",
    "low rank adapters train only a few parameters",
    "this movie was great and i loved it",
] * 4


def _config(tmp_path, name: str = "out", **overrides):
    base = {
        "output_dir": str(tmp_path / name), "max_length": 32, "per_device_train_batch_size": 4,
        "learning_rate": 1e-2, "max_steps": 8, "save_steps": 4, "logging_steps": 1, "lr_scheduler_type": "constant",
        "report_to": [], "use_cpu": True, "dataloader_num_workers": 0, "disable_tqdm": True, "seed": 0,
    }
    base.update(overrides)
    return trl.SFTConfig(**base)


def _dataset():
    return datasets.Dataset.from_dict({"text": TEXTS})


def _lora_llama(**kwargs) -> PeftModel:
    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                   **kwargs))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sft_trains_only_the_adapter_with_the_fused_head_and_adapter_only_checkpoints(tmp_path):
    model = _lora_llama()
    before = _snapshot(model)
    trainer = AdapterSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(),
                                processing_class=tiny_tokenizer())
    assert trainer.model is model
    inner = model.get_base_model()
    assert inner.__dict__["forward"].__func__.__code__.co_name == "_fused_forward"  # TRL patched the transformers model
    assert model.__dict__["forward"].__func__.__code__.co_name == "forward"  # ...and not the wrapper
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    assert any("mean_token_accuracy" in log for log in trainer.state.log_history)  # metric of the fused head
    after = _snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k in changed if "lora_B" in k} == {k for k in before if "lora_B" in k}
    for step in (4, 8):
        files = set(os.listdir(tmp_path / "out" / f"checkpoint-{step}"))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "tokenizer.json"} <= files
        assert not any(f.startswith(("model.safetensors", "pytorch_model")) for f in files)


def test_sft_resume_gives_the_uninterrupted_adapter(tmp_path):
    full = _lora_llama()
    AdapterSFTTrainer(model=full, args=_config(tmp_path, "a"), train_dataset=_dataset(),
                      processing_class=tiny_tokenizer()).train()
    resumed = _lora_llama(init_lora_weights="gaussian")
    trainer = AdapterSFTTrainer(model=resumed, args=_config(tmp_path, "b"), train_dataset=_dataset(),
                                processing_class=tiny_tokenizer())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    expected, got = _snapshot(full), _snapshot(resumed)
    lora = [k for k in expected if "lora_" in k]
    assert lora
    for key in lora:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, msg=key)


def test_peftkit_peft_config_wraps_a_plain_model(tmp_path):
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(TypeError, match="peft.PeftConfig"):  # what TRL alone does with a non-peft config
        trl.SFTTrainer(model=tiny_llama(), args=_config(tmp_path, "plain", max_steps=1), train_dataset=_dataset(),
                       processing_class=tiny_tokenizer(), peft_config=config)
    trainer = AdapterSFTTrainer(model=tiny_llama(), args=_config(tmp_path, max_steps=2, save_steps=2),
                                train_dataset=_dataset(), processing_class=tiny_tokenizer(), peft_config=config)
    assert isinstance(trainer.model, PeftModel) and config.r == 2
    trainer.train()
    assert os.path.isfile(tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors")


def test_prompt_learning_is_refused_for_trl(tmp_path):
    model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match="prompt-learning"):
        AdapterSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_dataset(),
                          processing_class=tiny_tokenizer())




def test_example_train_sft_runs(tmp_path):
    summary = run_example("train_sft.py", tmp_path, steps=6)
    assert summary["losses"][-1] < summary["losses"][0]
    checkpoint = tmp_path / "checkpoint-6"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
