"""GLoRA (generalised LoRA): the layer against the paper's formula written here, merging (also several adapters),
mixed batches, config errors, unsupported modules, and interop both ways with the reference (tiny Llama, BERT, an
MLP with biases) for every parameterisation.

The generic properties (identity, merge, save/load, multi-adapter, errors) come from the conformance suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from method_interop import check_interop_both_ways, interop_case
from numerics import fp_tol
from torch import nn

from peftkit import GloraConfig, get_peft_model
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.glora import GloraLayer

ATOL = 1e-5  # issue 22: interop outputs within 1e-5
MODES = [("lora", "lora", "constant"), ("vector", "vector", "vector"), ("constant", "none", "none"),
         ("none", "lora", "vector")]


class _Net(nn.Module):
    """Linear (16 -> 12, bias) -> ReLU -> Linear (12 -> 5, no bias), plus a Conv2d on the side."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 12)
        self.lin1 = nn.Linear(12, 5, bias=False)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _net(**kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(_Net(), GloraConfig(target_modules=["lin0", "lin1"], init_weights=False, **kwargs))


def _support(path: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense support tensor of one path in float64, written from the paper: ``Xd Xu``, a broadcast vector, a
    scalar, or zeros."""
    tensors = dict(path.named_parameters()) | dict(path.named_buffers())
    t = {k: v.detach().double() for k, v in tensors.items()}
    if "Xd" in t:
        return t["Xd"] @ t["Xu"]
    value = t.get("X", t.get("zeros"))
    return (value[0] if value.numel() == 1 and value.dim() == 1 and shape != (1,) else value).expand(shape)


def plain_glora(layer: GloraLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    """``x (W + W⊙A + B)ᵀ + b + b⊙D + E + W C`` in float64 (no bias: ``x (W + W⊙A + B)ᵀ``)."""
    W = layer.get_base_layer().weight.detach().double()
    out, inp = W.shape
    A, B = (_support(getattr(layer, f"glora_{k}")[name], (out, inp)) for k in "AB")
    y = x.double() @ (W + W * A + B).T
    b = layer.get_base_layer().bias
    if b is None:
        return y
    b = b.detach().double()
    C = _support(layer.glora_C[name], (inp, 1))
    D, E = (_support(getattr(layer, f"glora_{k}")[name], (out,)) for k in "DE")
    return y + b + b * D + E + (W @ C)[:, 0]


@pytest.mark.parametrize(("ab", "c", "de"), MODES)
def test_layer_matches_plain_formula(ab: str, c: str, de: str) -> None:
    """Each layer's output equals the plain formula for every parameterisation (with and without a base bias)."""
    model = _net(config_A_B=ab, config_C=c, config_D_E=de)
    x = torch.randn(3, 16)
    for mod_name, inp in (("lin0", x), ("lin1", torch.randn(3, 12))):
        layer = model.get_submodule(f"base_model.model.{mod_name}")
        got = layer(inp)
        # float32 matmul against a float64 one: reduction length = in_features
        torch.testing.assert_close(got.double(), plain_glora(layer, "default", inp), **fp_tol(torch.float32, 16))


def test_identity_at_init_and_trainable_shapes() -> None:
    """Default init is a no-op; a layer without bias trains only A and B (C/D/E are zero buffers, as the
    reference)."""
    torch.manual_seed(0)
    base = _Net()
    x = torch.randn(2, 16)
    ref = base(x)
    model = get_peft_model(base, GloraConfig(target_modules=["lin0", "lin1"]))
    torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("lin1.glora_C" in n or "lin1.glora_D" in n for n in trainable)
    assert any("lin0.glora_C.default.Xd" in n for n in trainable)


@pytest.mark.parametrize(("ab", "c", "de"), MODES)
def test_merge_unmerge_and_two_adapters(ab: str, c: str, de: str) -> None:
    """Merging one or two adapters (each against the original weights) gives the unmerged output; unmerging
    restores the base weights."""
    model = _net(config_A_B=ab, config_C=c, config_D_E=de)
    model.add_adapter("other", GloraConfig(target_modules=["lin0", "lin1"], init_weights=False, config_A_B=ab,
                                           config_C=c, config_D_E=de))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 16)
    expected = model(x)
    lin0 = model.get_submodule("base_model.model.lin0")
    w0, b0 = lin0.weight.detach().clone(), lin0.bias.detach().clone()
    # the plain formula with both updates, each computed against the original weights
    manual = plain_glora(lin0, "default", x[:, :16]) + plain_glora(lin0, "other", x) - (x.double() @ w0.double().T
                                                                                          + b0.double())
    torch.testing.assert_close(lin0(x).double(), manual, **fp_tol(torch.float32, 16))
    model.base_model.merge_adapter(["default"])
    model.base_model.merge_adapter(["other"])  # re-merges both against W0, as the reference
    tol = fp_tol(torch.float32, 16 + 12, factor=64)  # the merged weights round differently from the forward's
    torch.testing.assert_close(model(x), expected, **tol)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(lin0.weight.detach(), w0, **tol)
    torch.testing.assert_close(lin0.bias.detach(), b0, **tol)
    torch.testing.assert_close(model(x), expected, **tol)


def test_mixed_batch_rows_match_single_adapter_outputs() -> None:
    """``adapter_names`` per row: each row's output equals the output with only that adapter (or the base)."""
    model = _net()
    model.add_adapter("other", GloraConfig(target_modules=["lin0", "lin1"], init_weights=False))
    model.eval()
    x = torch.randn(3, 16)
    mixed = model(x, adapter_names=["default", "other", "__base__"])
    for row, name in enumerate(["default", "other"]):
        model.set_adapter(name)
        torch.testing.assert_close(mixed[row], model(x)[row], **fp_tol(torch.float32, 28))
    with model.disable_adapter():
        torch.testing.assert_close(mixed[2], model(x)[2], **fp_tol(torch.float32, 28))


@pytest.mark.parametrize(("field", "value"), [("config_A_B", "lorra"), ("config_C", "constant"),
                                             ("config_D_E", "lora"), ("r", 0), ("bias", "some"),
                                             ("init_weights", "yes")])
def test_config_errors_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        GloraConfig(**{field: value})
    assert isinstance(info.value, ValueError)


def test_non_linear_target_is_refused() -> None:
    with pytest.raises(UnsupportedModuleError, match="conv"):
        get_peft_model(_Net(), GloraConfig(target_modules=["conv"]))


INTEROP = [
    pytest.param("llama-causal", {"r": 4}, id="llama"),
    pytest.param("llama-causal", {"r": 2, "config_A_B": "none", "config_C": "none", "config_D_E": "none"},
                 id="llama-none"),
    pytest.param("bert-feat", {"r": 2, "config_A_B": "vector", "config_C": "vector", "config_D_E": "vector"},
                 id="bert-vector"),
    pytest.param("custom-mlp", {"r": 3, "config_A_B": "constant", "config_C": "lora", "config_D_E": "constant"},
                 id="mlp-constant"),
    pytest.param("custom-mlp", {"r": 2, "config_A_B": "lora", "config_C": "vector", "config_D_E": "vector",
                                "bias": "glora_only"}, id="mlp-vector"),
]
ESSENTIALS = ("peft_type", "r", "config_A_B", "config_C", "config_D_E", "init_weights", "bias")


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Perturbed adapters (zero buffers included): the saved files have the same keys, shapes, dtypes and config
    essentials, and each library loads the other's file with the saver's outputs (1e-5)."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, **kwargs}
    check_interop_both_ways(case, lambda lib: lib.GloraConfig(**kw), tmp_path, markers=("glora_",),
                            essentials=ESSENTIALS, tol={"atol": ATOL, "rtol": 0})


@pytest.mark.parametrize(("ab", "bias"), [("lora", True), ("vector", False), ("constant", True), ("none", True)])
def test_fused_training_linear_matches_plain_autograd(ab: str, bias: bool) -> None:
    """The training path that rebuilds ``W'`` in backward gives the plain autograd output and gradients (two
    adapters, inputs and the adapted bias included)."""
    from peftkit.methods.glora.fused import glora_linear, glora_linear_reference

    torch.manual_seed(0)
    W = torch.randn(6, 5)
    shapes = {"lora": [(6, 3), (3, 5)], "vector": [(6, 1)], "constant": [(1,)], "none": [(6, 5)]}[ab]
    supports = [tuple(tuple(torch.randn(s, requires_grad=True) for s in shapes) for _ in "AB") for _ in range(2)]
    b = torch.randn(6, requires_grad=True) if bias else None
    x = torch.randn(2, 4, 5, requires_grad=True)
    leaves = [x, *(t for pair in supports for parts in pair for t in parts), *([b] if bias else [])]
    results = []
    for fn in (glora_linear, glora_linear_reference):
        y = fn(x, W, b, supports)
        results.append((y, torch.autograd.grad((y * torch.linspace(-1, 1, 6)).sum(), leaves)))
    tol = fp_tol(torch.float32, 5 * 8)  # same math, other summation order; reductions over in and over tokens
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize(("ab", "de"), [("lora", "constant"), ("vector", "constant"), ("constant", "vector"),
                                        ("constant", "constant")])
def test_inspect_strength_is_the_norm_of_the_broadcast_supports(ab: str, de: str) -> None:
    """``peftkit inspect``'s measure from saved tensors: ``[out, in]`` and ``sqrt(‖A‖² + ‖B‖²)`` over ``(out, in)``;
    when every support but C is a scalar the files do not tell ``out``: ``[0, in]`` and the scalars' norm."""
    from peftkit.methods.glora import GLORA

    layer = _net(config_A_B=ab, config_D_E=de).get_submodule("base_model.model.lin0")
    params = {key: t.detach() for key, (_, t) in layer.adapter_state("default").items()}
    shape, _, norm, _ = GLORA.update_strength(params, {})
    out = 0 if (ab, de) == ("constant", "constant") else 12
    dense = (out or 1, 16 if out else 1)
    want = sum(_support(getattr(layer, f"glora_{k}")["default"], dense).square().sum() for k in "AB") ** 0.5
    assert shape == [out, 16]
    assert norm == pytest.approx(float(want), rel=1e-6)
