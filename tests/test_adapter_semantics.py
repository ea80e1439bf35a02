"""Adapter management semantics where peftkit deliberately differs from the reference (documented in README)."""

from __future__ import annotations

import pytest
import torch
from models import causal_lm_inputs, tiny_llama
from torch import nn

from peftkit import LoraConfig, get_peft_model

CFG = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "init_lora_weights": False}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _params(model, adapter):
    return [p for n, p in model.named_parameters() if f".{adapter}." in n]


def test_set_adapter_inference_mode_overrides_trainability(tmp_path):
    source = get_peft_model(tiny_llama(), LoraConfig(**CFG))
    source.save_pretrained(tmp_path)
    model = get_peft_model(tiny_llama(), LoraConfig(**CFG))
    model.load_adapter(tmp_path, "loaded")  # frozen: is_trainable=False
    model.set_adapter("loaded")
    assert not any(p.requires_grad for p in _params(model, "loaded"))
    model.set_adapter("loaded", inference_mode=False)
    assert all(p.requires_grad for p in _params(model, "loaded"))
    model.set_adapter("loaded", inference_mode=True)
    assert not any(p.requires_grad for p in _params(model, "loaded"))


def test_adapter_added_in_inference_mode_never_trains():
    model = get_peft_model(tiny_llama(), LoraConfig(**CFG))
    model.add_adapter("frozen", LoraConfig(**CFG, inference_mode=True))
    model.set_adapter("frozen")
    assert not any(p.requires_grad for p in _params(model, "frozen"))
    assert model.get_nb_trainable_parameters()[0] == 0


def test_merged_and_unmerged_active_adapters_both_apply():
    """With "other" merged and "default" active, the output is base + both updates (the reference drops "default")."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(**CFG)).eval()
    model.add_adapter("other", LoraConfig(**CFG))
    inputs = causal_lm_inputs(2)
    model.base_model.set_adapter(["default", "other"])
    both = _logits(model, inputs)
    model.set_adapter("other")
    model.merge_adapter()
    model.set_adapter("default")
    mixed = _logits(model, inputs)
    torch.testing.assert_close(mixed, both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    only_default = _logits(model, inputs)
    assert (only_default - both).abs().max() > 1e-3


def test_user_config_object_untouched_by_adapter_management(tmp_path):
    config = LoraConfig(**CFG)
    before = config.to_dict()
    model = get_peft_model(tiny_llama(), config)
    model.add_adapter("b", config)
    model.save_pretrained(tmp_path)
    model.delete_adapter("b")
    assert config.to_dict() == before
    assert model.peft_config["default"] is not config


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_adapters_injected_into_an_eval_model_are_in_eval_mode(dropout):
    """The reference leaves new adapter modules (their dropout above all) in training mode inside an eval-mode
    model, so inference is random (PEFT issue #3753); peftkit's new modules take the base layer's mode."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    config = {"target_modules": ["0", "2"], "r": 2, "lora_dropout": dropout, "init_lora_weights": False}
    model = get_peft_model(base, LoraConfig(**config))
    assert model.training is False and model.base_model.training is False
    model.add_adapter("other", LoraConfig(**config))
    model.base_model.set_adapter(["default", "other"])
    assert [n for n, m in model.named_modules() if m.training] == []
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
    model.train()
    model.add_adapter("third", LoraConfig(**config))  # a training-mode model gets training-mode adapters
    assert all(m.training for _, m in model.named_modules())
