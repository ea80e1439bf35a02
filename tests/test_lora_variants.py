"""LoRA variants (``peftkit.methods.lora.variants``): a variant is chosen once per adapter per layer, and every path
of the layer (the fused training node, the no-grad plan and its cached ``scaling * B.T``, in-place updates, the
compiled plain formula, several adapters) runs an adapter with a variant through the variant's ``forward``; a
fast path never silently computes plain LoRA for it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import peftkit.methods.lora.layers as lora_layers
from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora.layers import LoraLayer
from peftkit.methods.lora.variants import DoraVariant, LoraVariant, variant_for
from tests.models import Conv2dModel, EmbModel

OFFSET = 7.0  # what the dummy variant adds: far from anything plain LoRA (B = 0 at init) could produce


class ShiftVariant(LoraVariant):
    """A variant whose forward adds a constant to the output and ignores lora_A / lora_B."""

    name = "Shift"

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor,
                base_out: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return result + OFFSET


def _shift_for(layer: LoraLayer, use_dora: bool = False, **options: Any) -> LoraVariant | None:
    return ShiftVariant()


class TwoLinear(nn.Module):
    """x: (..., 12) -> (..., 8), no bias on the first layer (the fused node's and the plan's favourite case)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 10, bias=False)
        self.lin1 = nn.Linear(10, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.lin0(x))


def _shifted(model: nn.Module, monkeypatch: pytest.MonkeyPatch, target: list[str], **kw: Any) -> nn.Module:
    monkeypatch.setattr(lora_layers, "variant_for", _shift_for)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target, **kw))



@pytest.mark.parametrize("mode", ["train_grad", "eval_no_grad", "eval_inference_mode", "eval_grad", "compile_path"])
def test_variant_forward_runs_on_every_linear_path(monkeypatch, mode):
    torch.manual_seed(0)
    model = _shifted(TwoLinear(), monkeypatch, ["lin0"])
    layer = model.base_model.model.lin0
    assert isinstance(layer._variants["default"], ShiftVariant)
    base = layer.get_base_layer()
    x = torch.randn(3, 5, 12)
    expected = base(x).detach() + OFFSET
    if mode == "compile_path":
        out = layer._plain_forward(x)
    elif mode == "train_grad":
        layer.train()
        out = layer(x)
    else:
        layer.eval()
        ctx = {"eval_no_grad": torch.no_grad, "eval_inference_mode": torch.inference_mode,
               "eval_grad": torch.enable_grad}[mode]
        with ctx():
            outs = [layer(x) for _ in range(3)]  # the second and third no-grad calls would run the cached plan
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=0, atol=0)  # the same call repeated: same kernels
        out = outs[0]
    # the same base kernel on the same data, plus a constant: equal to float32 rounding of the addition
    torch.testing.assert_close(out.detach(), expected, rtol=1e-6, atol=1e-6)


def test_decode_sized_inputs_do_not_take_the_plan(monkeypatch):
    """One row at a time, as ``generate`` decodes: the no-grad plan and the native kernel serve plain LoRA only."""
    model = _shifted(TwoLinear(), monkeypatch, ["lin0"]).eval()
    layer = model.base_model.model.lin0
    x = torch.randn(1, 1, 12)
    with torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + OFFSET, rtol=1e-6, atol=1e-6)
    assert layer._lean_plan is None and not layer._bt_cache


def test_plain_adapter_beside_a_variant_keeps_plain_lora(monkeypatch):
    """Two active adapters, one plain and one with a variant: each gets its own formula."""
    torch.manual_seed(0)
    model = get_peft_model(TwoLinear(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0"],
                                                   init_lora_weights=False))
    monkeypatch.setattr(lora_layers, "variant_for", _shift_for)
    model.add_adapter("shift", LoraConfig(r=4, lora_alpha=8, target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    layer.set_adapter(["default", "shift"])
    assert "default" not in layer._variants and "shift" in layer._variants
    x = torch.randn(2, 3, 12)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.get_base_layer()(x) + layer.scaling["default"] * (x @ A.t() @ B.t()) + OFFSET
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            # float32: two summation orders over 12 + 4 terms
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_cls, target, x", [
    (EmbModel, ["emb"], torch.randint(0, 100, (2, 5))),
    (Conv2dModel, ["conv"], torch.randn(2, 3, 8, 8)),
])
def test_variant_forward_runs_on_embedding_and_conv(monkeypatch, model_cls, target, x):
    model = _shifted(model_cls(), monkeypatch, target)
    layer = dict(model.base_model.model.named_modules())[target[0]]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + OFFSET, rtol=1e-6, atol=1e-6)


def test_variant_without_merge_refuses_to_merge(monkeypatch):
    model = _shifted(TwoLinear(), monkeypatch, ["lin0"])
    with pytest.raises(ValueError, match="Shift adapters cannot be merged"):
        model.merge_adapter()


def test_mixed_batch_names_the_variant(monkeypatch):
    model = _shifted(TwoLinear(), monkeypatch, ["lin0"]).eval()
    with pytest.raises(ValueError, match="not supported with Shift adapters"), torch.no_grad():
        model(torch.randn(2, 12), adapter_names=["default", "__base__"])


def test_variant_for_picks_dora_and_plain():
    layer = get_peft_model(TwoLinear(), LoraConfig(r=2, target_modules=["lin0"])).base_model.model.lin0
    assert variant_for(layer) is None
    assert isinstance(variant_for(layer, use_dora=True), DoraVariant)
    dora = get_peft_model(TwoLinear(), LoraConfig(r=2, target_modules=["lin0"], use_dora=True))
    assert isinstance(dora.base_model.model.lin0._variants["default"], DoraVariant)
