"""Biases selected by ``bias="lora_only"`` / ``"all"`` inside an adapted ``nn.MultiheadAttention``: the base bias of
its LoRA ``out_proj`` (``attn.base_layer.out_proj.base_layer.bias``) is saved and loaded as the reference does.

Found by the conformance suite's MultiheadAttention case (issue 18): peftkit trained that bias but did not save it,
so a reload lost it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftkit

peft = pytest.importorskip("peft")


class AttnNet(nn.Module):
    """Linear -> MultiheadAttention (E=8, 2 heads, batch first) -> Linear; ``x: (N, T, 8) -> (N, T, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


OUT_PROJ_BIAS = "base_model.model.attn.base_layer.out_proj.base_layer.bias"


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_saved_bias_keys_match_the_reference(bias: str) -> None:
    ours = peftkit.get_peft_model(AttnNet(), peftkit.LoraConfig(target_modules=["attn"], bias=bias))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(AttnNet(), peft.LoraConfig(target_modules=["attn"], bias=bias))
    keys = set(peftkit.get_peft_model_state_dict(ours))
    assert OUT_PROJ_BIAS in keys and keys == set(peft.get_peft_model_state_dict(ref))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_out_proj_bias_survives_save_and_load(bias: str, tmp_path) -> None:
    """The trained bias is restored exactly by peftkit and by the reference (same tensor, copied)."""
    model = peftkit.get_peft_model(AttnNet(), peftkit.LoraConfig(target_modules=["attn"], bias=bias))
    trained = model.get_submodule("base_model.model.attn.base_layer.out_proj.base_layer").bias
    with torch.no_grad():
        trained.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = peftkit.PeftModel.from_pretrained(AttnNet(), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(AttnNet(), tmp_path)
    for other in (loaded, ref):
        restored = other.get_submodule("base_model.model.attn.base_layer.out_proj.base_layer").bias
        assert torch.equal(restored, trained)  # a copy of the saved tensor
