"""LoRA layer math against dense references computed from the layer's own tensors: forward, delta weights,
merges, initialisation distributions, scaling, lora_bias, dropout, and the in-place gradient path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from models import CASES_BY_NAME, causal_lm_inputs, tiny_gpt2, tiny_llama
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora.layers import Conv, Embedding, Linear, LoraLayer

ATOL = 1e-5


def _make(layer_cls, base, r=4, alpha=8.0, **kwargs):
    torch.manual_seed(0)
    layer = layer_cls(base, fan_in_fan_out=kwargs.pop("fan_in_fan_out", False))
    layer.update_layer("default", r=r, lora_alpha=alpha, init_lora_weights=kwargs.pop("init", False), **kwargs)
    layer.set_adapter("default")
    return layer


def _randomise_(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.copy_(torch.randn_like(tensor))


# ---------------------------------------------------------------------------------------------- forward math


def test_linear_forward_and_merge():
    torch.manual_seed(1)
    base = nn.Linear(10, 6)
    layer = _make(Linear, base, r=3, alpha=6.0)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    assert s == 2.0
    x = torch.randn(2, 5, 10)
    with torch.no_grad():
        expected = base(x) + s * x @ A.T @ B.T
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.get_delta_weight("default"), s * B @ A, atol=ATOL, rtol=0)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(F.linear(x, base.weight, base.bias), expected, atol=ATOL, rtol=0)
        layer.unmerge()
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_gpt2_conv1d_forward_and_merge():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    base = Conv1D(nf=12, nx=8)  # weight (in=8, out=12)
    _randomise_(base.bias)
    layer = _make(Linear, base, r=2, alpha=4.0, fan_in_fan_out=True)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    assert A.shape == (2, 8) and B.shape == (12, 2)
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        expected = x @ base.weight + base.bias + s * x @ A.T @ B.T
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
        delta = layer.get_delta_weight("default")
        assert delta.shape == (8, 12)
        torch.testing.assert_close(delta, (s * B @ A).T, atol=ATOL, rtol=0)
        layer.merge()
        torch.testing.assert_close(x @ base.weight + base.bias, expected, atol=ATOL, rtol=0)


def test_embedding_forward_and_merge():
    torch.manual_seed(1)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = _make(Embedding, base, r=3, alpha=3.0)
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    s = layer.scaling["default"]
    assert A.shape == (3, 20) and B.shape == (6, 3) and s == 1.0
    _randomise_(A)
    x = torch.randint(0, 20, (2, 7))
    with torch.no_grad():
        expected = base(x) + F.embedding(x, A.T, padding_idx=0) @ B.T * s
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.get_delta_weight("default"), (B @ A).T * s, atol=ATOL, rtol=0)
        layer.merge()
        torch.testing.assert_close(F.embedding(x, base.weight), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("conv", "fn", "spatial", "kwargs"), [
    (nn.Conv1d, F.conv1d, (11,), {"kernel_size": 3, "padding": 1}),
    (nn.Conv2d, F.conv2d, (9, 8), {"kernel_size": 3, "stride": 2, "padding": 1}),
    (nn.Conv2d, F.conv2d, (9, 9), {"kernel_size": (3, 1), "dilation": 2}),
], ids=["conv1d", "conv2d-stride", "conv2d-dilation"])
def test_conv_delta_kernel(conv, fn, spatial, kwargs):
    torch.manual_seed(1)
    base = conv(4, 6, **kwargs)
    layer = _make(Conv, base, r=3, alpha=6.0)
    x = torch.randn(2, 4, *spatial)
    with torch.no_grad():
        delta = layer.get_delta_weight("default")
        assert delta.shape == base.weight.shape
        expected = fn(x, base.weight + delta, base.bias, base.stride, base.padding, base.dilation)
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
        layer.merge()
        torch.testing.assert_close(base(x), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- init


def test_init_default_kaiming_uniform_and_zero_B():
    layer = _make(Linear, nn.Linear(256, 64), r=8, init=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bound = 1 / math.sqrt(256)
    assert A.abs().max() <= bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # std of U(-b, b)
    assert torch.count_nonzero(B) == 0
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


def test_init_gaussian():
    layer = _make(Linear, nn.Linear(256, 64), r=8, init="gaussian")
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert abs(A.mean().item()) < 0.02
    assert torch.count_nonzero(B) == 0


def test_init_false_is_not_identity():
    layer = _make(Linear, nn.Linear(16, 8), r=4, init=False)
    assert torch.count_nonzero(layer.lora_B["default"].weight) > 0
    x = torch.randn(3, 16)
    assert not torch.allclose(layer(x), layer.base_layer(x), atol=1e-4)


def test_embedding_init():
    layer = _make(Embedding, nn.Embedding(50, 256), r=8, init=True)
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert torch.count_nonzero(A) == 0
    assert B.shape == (256, 8)
    assert B.std().item() == pytest.approx(1.0, rel=0.1)
    assert abs(B.mean().item()) < 0.1
    x = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


def test_conv_init_identity():
    layer = _make(Conv, nn.Conv2d(3, 5, 3), r=2, init=True)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- scaling


@pytest.mark.parametrize(("r", "alpha", "rslora", "expected"), [
    (8, 16, False, 2.0), (8, 16, True, 16 / math.sqrt(8)), (4, 8, True, 4.0), (1, 3, False, 3.0),
])
def test_scaling(r, alpha, rslora, expected):
    layer = _make(Linear, nn.Linear(8, 8), r=r, alpha=alpha, use_rslora=rslora)
    assert layer.scaling["default"] == pytest.approx(expected)
    x = torch.randn(2, 8)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + expected * x @ A.T @ B.T, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- lora_bias


def test_lora_bias_adds_and_merges():
    torch.manual_seed(2)
    base = nn.Linear(6, 5)
    layer = _make(Linear, base, r=2, alpha=6.0, lora_bias=True)
    lora_B = layer.lora_B["default"]
    assert lora_B.bias is not None
    _randomise_(lora_B.bias)
    A, B, b, s = layer.lora_A["default"].weight, lora_B.weight, lora_B.bias, layer.scaling["default"]
    x = torch.randn(4, 6)
    bias_before = base.bias.detach().clone()
    with torch.no_grad():
        expected = base(x) + s * (x @ A.T @ B.T + b)
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
        layer.merge()
        torch.testing.assert_close(base.bias, bias_before + s * b, atol=ATOL, rtol=0)
        torch.testing.assert_close(base(x), expected, atol=ATOL, rtol=0)
        layer.unmerge()
        torch.testing.assert_close(base.bias, bias_before, atol=ATOL, rtol=0)


def test_lora_bias_zero_at_default_init():
    layer = _make(Linear, nn.Linear(6, 5), r=2, init=True, lora_bias=True)
    assert torch.count_nonzero(layer.lora_B["default"].bias) == 0


# ---------------------------------------------------------------------------------------------- dropout


def test_dropout_train_vs_eval():
    layer = _make(Linear, nn.Linear(32, 16), r=4, lora_dropout=0.5)
    x = torch.randn(8, 32)
    layer.train()
    torch.manual_seed(3)
    first = layer(x).detach()
    second = layer(x).detach()
    assert not torch.allclose(first, second)
    layer.eval()
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    with torch.no_grad():
        expected = layer.base_layer(x) + s * x @ A.T @ B.T
        torch.testing.assert_close(layer(x), layer(x), atol=0, rtol=0)
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_dropout_applies_to_lora_branch_only():
    layer = _make(Linear, nn.Linear(32, 16), r=4, lora_dropout=0.9).train()
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
    x = torch.randn(8, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- in-place gradients


def _lora_grads(model, loss_fn, inplace: bool) -> dict[str, torch.Tensor]:
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer._inplace = inplace
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


@pytest.mark.parametrize(("build", "targets", "loss_fn"), [
    (tiny_llama, LLAMA_TARGETS, lambda m: m(**causal_lm_inputs(2)).loss),
    (tiny_gpt2, ["c_attn", "c_proj", "c_fc", "wte"], lambda m: m(**causal_lm_inputs(2)).loss),
    (CASES_BY_NAME["custom-conv2d"].build, ["conv", "lin0"],
     lambda m: m(**CASES_BY_NAME["custom-conv2d"].make_inputs(2)).pow(2).sum()),
], ids=["llama", "gpt2", "conv2d"])
def test_inplace_gradients_equal_out_of_place(build, targets, loss_fn):
    config = LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)
    model = get_peft_model(build(), config).eval()  # eval: no dropout, deterministic
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(layer._inplace for layer in layers)  # the fast path is the default here
    fast = _lora_grads(model, loss_fn, inplace=True)
    slow = _lora_grads(model, loss_fn, inplace=False)
    assert fast.keys() == slow.keys() and len(fast) == 2 * len(layers)
    for name in fast:
        assert fast[name].abs().sum() > 0, name
        torch.testing.assert_close(fast[name], slow[name], atol=1e-5, rtol=1e-4, msg=name)


def test_linear_layers_take_the_inplace_path(monkeypatch):
    import peftkit.methods.lora.fastpath as lora_fastpath
    import peftkit.methods.lora.layers as lora_layers

    calls = []
    real = lora_layers.add_lora_

    def spy(result, *args):
        out = real(result, *args)
        calls.append(out is result)
        return out

    fused = []
    real_fused = lora_fastpath.linear_lora
    monkeypatch.setattr(lora_layers, "add_lora_", spy)
    monkeypatch.setattr(lora_fastpath, "linear_lora", lambda *a: fused.append(1) or real_fused(*a))
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    model(**causal_lm_inputs(2)).loss.backward()  # training mode, one adapter: the fused base + adapter node
    assert len(fused) == 4 and calls == []
    model.add_adapter("other", LoraConfig(target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    model(**causal_lm_inputs(2)).loss.backward()  # two adapters: each added into the base output in place
    assert len(fused) == 4 and len(calls) == 8 and all(calls)
