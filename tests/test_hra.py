"""HRA (Householder reflection adaptation): the layer against a dense product of reflections written here, init
(identity, odd rank, Gram-Schmidt), merging, several adapters, mixed batches, bias training, config errors,
unsupported modules, gradients, and interop both ways with the reference (tiny Llama, BERT, an MLP, Conv2d).

The generic properties (identity, merge, save/load, multi-adapter, errors) come from the conformance suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from method_interop import check_interop_both_ways, interop_case
from numerics import TINY_MODEL_REDUCTION, fp_tol
from torch import nn

from peftkit import HRAConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peftkit.errors import ConfigError, PeftWarning, UnsupportedModuleError
from peftkit.methods.hra import HRAGroupedConvError, HRALayer
from peftkit.methods.hra.layers import GS_INIT_WARNING, ODD_RANK_WARNING

ATOL = 1e-5  # issue 21: interop outputs within 1e-5


# ------------------------------------------------------------------------------------------------ plain math
def plain_reflection(u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """``R: (n, n)`` from ``u: (n, r)`` by the paper's formula, in float64: ``∏_i (I - 2 u_i u_iᵀ / |u_i|²)`` left to
    right, or with Gram-Schmidt ``I - 2 Q Qᵀ`` (classical GS written out)."""
    u = u.detach().double()
    n, r = u.shape
    eye = torch.eye(n, dtype=torch.float64)
    if apply_gs:
        cols: list[torch.Tensor] = []
        for i in range(r):
            v = u[:, i] - sum(((c @ u[:, i]) * c for c in cols), torch.zeros(n, dtype=torch.float64))
            cols.append(v / v.norm())
        q = torch.stack(cols, dim=1)
        return eye - 2 * q @ q.T
    out = eye
    for i in range(r):
        ui = u[:, i : i + 1]
        out = out @ (eye - 2 * ui @ ui.T / (ui.T @ ui))
    return out


class _Net(nn.Module):
    """Linear (16 -> 12) -> ReLU -> Linear (12 -> 5), plus a Conv2d and a Conv1d branch on the side."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 12)
        self.lin1 = nn.Linear(12, 5)
        self.conv2 = nn.Conv2d(3, 4, (3, 2), padding=(1, 0), stride=(2, 1), dilation=(1, 2))
        self.conv1 = nn.Conv1d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lin1(torch.relu(self.lin0(x))).flatten(1), self.conv2(img).flatten(1),
                          self.conv1(seq).flatten(1)], dim=1)


def _net_inputs(batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 16, generator=gen), "img": torch.randn(batch, 3, 6, 7, generator=gen),
            "seq": torch.randn(batch, 3, 9, generator=gen)}


def _net_peft(r: int = 4, seed: int = 0, **kwargs: Any) -> PeftModel:
    torch.manual_seed(seed)
    config = HRAConfig(r=r, target_modules=["lin0", "lin1", "conv2", "conv1"], **{"init_weights": False, **kwargs})
    return get_peft_model(_Net(), config).eval()


def _plain_forward(model: PeftModel, inputs: dict[str, torch.Tensor], names: list[str],
                   apply_gs: bool) -> torch.Tensor:
    """The net with every adapted weight replaced by ``W R_1 R_2 ⋯`` (dense, float64), run in float64."""
    net = model.base_model.model
    x, img, seq = (inputs[k].double() for k in ("x", "img", "seq"))

    def weight(layer: HRALayer) -> torch.Tensor:
        w = layer.get_base_layer().weight.detach().double()
        flat = w.reshape(w.shape[0], -1)
        for name in names:
            flat = flat @ plain_reflection(layer.hra_u[name], apply_gs)
        return flat.reshape(w.shape)

    def bias(layer: HRALayer) -> torch.Tensor:
        return layer.get_base_layer().bias.detach().double()

    h = torch.relu(x @ weight(net.lin0).T + bias(net.lin0))
    y = h @ weight(net.lin1).T + bias(net.lin1)
    c2 = F.conv2d(img, weight(net.conv2), bias(net.conv2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    c1 = F.conv1d(seq, weight(net.conv1), bias(net.conv1), padding=1)
    return torch.cat([y.flatten(1), c2.flatten(1), c1.flatten(1)], dim=1)


# float32 layers against a float64 dense product: reductions of at most 16 inputs (linear) or 3·3·2 (conv) plus
# the rank-r correction, through two layers
TOL_PLAIN = fp_tol(torch.float32, 2 * (16 + 8))


@pytest.mark.parametrize("apply_gs", [False, True], ids=["householder", "gram-schmidt"])
def test_layers_match_the_plain_product_of_reflections(apply_gs: bool) -> None:
    """Linear, Conv2d (non-square kernel, stride, dilation) and Conv1d: ``y = x (W R)ᵀ + b`` with the dense
    ``R`` built here, for one adapter and for two active adapters (``W R_a R_b``)."""
    model = _net_peft(apply_GS=apply_gs)
    model.add_adapter("b", HRAConfig(r=3, target_modules=["lin0", "lin1", "conv2", "conv1"], init_weights=False,
                                     apply_GS=apply_gs))
    inputs = _net_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).double(), _plain_forward(model, inputs, ["default"], apply_gs),
                                   **TOL_PLAIN)
        model.base_model.set_adapter(["default", "b"])
        torch.testing.assert_close(model(**inputs).double(),
                                   _plain_forward(model, inputs, ["default", "b"], apply_gs), **TOL_PLAIN)


def test_reflection_is_orthogonal_and_matches_plain() -> None:
    """``HRALayer.reflection`` (the reference's ``get_delta_weight``) equals the plain product and is orthogonal."""
    model = _net_peft(r=5)
    layer = model.base_model.model.lin0
    r = layer.reflection("default").double()
    torch.testing.assert_close(r, plain_reflection(layer.hra_u["default"], False), **fp_tol(torch.float32, 16))
    torch.testing.assert_close(r @ r.T, torch.eye(16, dtype=torch.float64), **fp_tol(torch.float32, 16))



@pytest.mark.parametrize("apply_gs", [False, True], ids=["householder", "gram-schmidt"])
def test_inspect_strength_is_the_distance_of_the_plain_reflection_from_identity(apply_gs: bool) -> None:
    """``peftkit inspect``'s measure of an HRA layer (``MethodSpec.update_strength``, from ``hra_u`` alone) is
    ``‖R - I‖_F`` of the plain dense product of reflections."""
    from peftkit.methods.hra import HRA

    u = torch.randn(16, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    shape, rank, strength, _ = HRA.update_strength({"hra_u": u}, {"apply_GS": apply_gs})
    expected = torch.linalg.matrix_norm(plain_reflection(u, apply_gs) - torch.eye(16, dtype=torch.float64))
    assert (shape, rank) == ([16, 16], 5)
    # both sides in float64 from the same u: a trace identity against a dense 16x16 product
    assert strength == pytest.approx(float(expected), rel=1e-9)

# ------------------------------------------------------------------------------------------------ init
def test_default_init_is_exactly_identity_with_paired_columns() -> None:
    """``init_weights=True`` with even ``r``: columns come in identical pairs and the outputs equal the base
    outputs to the bit (the factors are float64; the reference's float32 product is off by ~1 ulp)."""
    model = _net_peft(r=4, init_weights=True)
    u = model.base_model.model.lin0.hra_u["default"]
    assert u.shape == (16, 4) and torch.equal(u[:, 0], u[:, 1]) and torch.equal(u[:, 2], u[:, 3])
    assert not torch.equal(u[:, 0], u[:, 2])
    inputs = _net_inputs()
    with torch.no_grad():
        out = model(**inputs)
        with model.disable_adapter():
            base = model(**inputs)
    assert torch.equal(out, base)


def test_odd_rank_warns_and_is_random() -> None:
    """Odd ``r`` cannot start at the identity: the reference's warning, random columns."""
    with pytest.warns(PeftWarning, match="r is odd"):
        model = _net_peft(r=3, init_weights=True)
    assert ODD_RANK_WARNING.startswith("The symmetric initialization")
    inputs = _net_inputs()
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs)
    assert (model(**inputs) - base).abs().max() > 1e-3


def test_gram_schmidt_init_gives_an_orthogonal_reflection() -> None:
    """``apply_GS=True`` with ``init_weights=True``: the reference pairs the columns, so Gram-Schmidt divides rounding
    noise by ~0 and ``R`` is not orthogonal (``|R Rᵀ - I|`` ~ 3 on this shape). peftkit warns and draws every column
    at random, so ``R = I - 2QQᵀ`` is an orthogonal reflection."""
    with pytest.warns(PeftWarning, match="apply_GS=True cannot start at the identity"):
        model = _net_peft(r=4, init_weights=True, apply_GS=True)
    assert GS_INIT_WARNING
    for name in ("lin0", "lin1", "conv2", "conv1"):
        layer = model.base_model.model.get_submodule(name)
        r = layer.reflection("default").double()
        eye = torch.eye(r.shape[0], dtype=torch.float64)
        torch.testing.assert_close(r @ r.T, eye, **fp_tol(torch.float32, r.shape[0]))


# ------------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("apply_gs", [False, True], ids=["householder", "gram-schmidt"])
def test_merge_unmerge_and_unload(apply_gs: bool) -> None:
    """Merged outputs equal unmerged ones; unmerging (``W Rᵀ``) restores the base weights; merge_and_unload gives
    plain modules with the same outputs; two merged adapters compose like two active ones."""
    model = _net_peft(apply_GS=apply_gs)
    model.add_adapter("b", HRAConfig(r=2, target_modules=["lin0", "conv2"], init_weights=False, apply_GS=apply_gs))
    model.base_model.set_adapter(["default", "b"])
    inputs = _net_inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model(**inputs)
        model.merge_adapter()
        torch.testing.assert_close(model(**inputs), unmerged, **TOL_PLAIN)
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in before:  # two rank-r rotations and back, in float64, rounded to float32 once per step
                torch.testing.assert_close(p.detach(), before[n], **fp_tol(torch.float32, 4 * 8))
        merged = model.merge_and_unload()
        assert not any(isinstance(m, HRALayer) for m in merged.modules())
        torch.testing.assert_close(merged(**inputs), unmerged, **TOL_PLAIN)


def test_safe_merge_refuses_nan() -> None:
    model = _net_peft()
    with torch.no_grad():
        model.base_model.model.lin0.hra_u["default"][0, 0] = float("nan")
    weight = model.base_model.model.lin0.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        model.base_model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin0.get_base_layer().weight, weight)


def test_get_delta_weight_is_the_additive_merge() -> None:
    """``get_delta_weight`` is ``W R - W`` in the base weight's shape (what merging adds)."""
    model = _net_peft()
    for name in ("lin0", "conv2"):
        layer = model.base_model.model.get_submodule(name)
        w = layer.get_base_layer().weight.detach()
        expected = (w.double().reshape(w.shape[0], -1) @ plain_reflection(layer.hra_u["default"], False)).reshape(
            w.shape) - w.double()
        torch.testing.assert_close(layer.get_delta_weight("default").double(), expected, **TOL_PLAIN)


# ------------------------------------------------------------------------------------------------ misc behaviour
def test_mixed_batch_rows_follow_their_adapter() -> None:
    model = _net_peft()
    model.add_adapter("other", HRAConfig(r=2, target_modules=["lin0", "lin1", "conv2", "conv1"],
                                         init_weights=False))
    inputs = _net_inputs(batch=3)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["other", "__base__", "default"])
        singles = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            singles[name] = model(**inputs)
        with model.disable_adapter():
            singles["__base__"] = model(**inputs)
    for row, name in enumerate(["other", "__base__", "default"]):
        torch.testing.assert_close(mixed[row], singles[name][row], **TOL_PLAIN)


def test_bias_hra_only_trains_only_the_adapted_layers_biases() -> None:
    """``bias="hra_only"`` (the reference's ``<prefix>_only``): the biases of HRA layers train, no other bias."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model = get_peft_model(net, HRAConfig(r=2, target_modules=["0"], bias="hra_only"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.0.base_layer.bias", "base_model.model.0.hra_u.default"]


def test_gradients_match_the_reference() -> None:
    """One loss, same weights: peftkit's gradients of ``hra_u`` equal the reference's (the compact form trains the
    same function as the dense product)."""
    import peft

    config = {"r": 4, "target_modules": ["lin0", "lin1"], "init_weights": False}
    torch.manual_seed(0)
    ours = get_peft_model(_Net(), HRAConfig(**config))
    torch.manual_seed(0)
    ref = peft.get_peft_model(_Net(), peft.HRAConfig(**config))
    peft.set_peft_model_state_dict(ref, get_peft_model_state_dict(ours))
    inputs = _net_inputs()
    ours(**inputs).square().sum().backward()
    ref(**inputs).square().sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads
    for n, p in ours.named_parameters():
        if p.requires_grad:
            # the same math in another order: a few dozen terms per element, and the loss sums 3·(5 + 4·... ) outputs
            torch.testing.assert_close(p.grad, grads[n], **fp_tol(torch.float32, 4 * TINY_MODEL_REDUCTION))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"),
    ({"r": 2.5}, "r"),
    ({"apply_GS": "yes"}, "apply_GS"),
    ({"init_weights": None}, "init_weights"),
    ({"bias": "lora_only"}, "bias"),
    ({"target_modules": "lin.*", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": "lin.*", "layers_pattern": "layers"}, "layers_pattern"),
    ({"target_modules": ["lin0"], "layers_pattern": "layers"}, "layers_pattern"),
])
def test_config_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        HRAConfig(**kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)  # the reference raises ValueError


def test_unsupported_modules_raise_typed_errors() -> None:
    """Embeddings are refused (``TypeError`` as the reference); grouped convolutions with ``NotImplementedError``."""
    emb = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(UnsupportedModuleError) as info:
        get_peft_model(emb, HRAConfig(r=2, target_modules=["0"]))
    assert isinstance(info.value, TypeError)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(HRAGroupedConvError) as info2:
        get_peft_model(grouped, HRAConfig(r=2, target_modules=["0"]))
    assert isinstance(info2.value, NotImplementedError) and "groups=2" in str(info2.value)


# ------------------------------------------------------------------------------------------------ interop
INTEROP = [
    pytest.param("llama-causal", {"r": 4}, id="llama"),
    pytest.param("llama-causal", {"r": 3, "apply_GS": True}, id="llama-gs"),
    pytest.param("bert-feat", {"r": 2}, id="bert"),
    pytest.param("custom-mlp", {"r": 4, "bias": "hra_only"}, id="mlp"),
    pytest.param("custom-conv2d", {"r": 4, "target_modules": ["conv", "lin0"]}, id="conv2d"),
    pytest.param("custom-conv2d", {"r": 2, "apply_GS": True}, id="conv2d-gs"),
]
ESSENTIALS = ("peft_type", "r", "apply_GS", "init_weights", "bias", "layers_to_transform", "layers_pattern")


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Random (non-identity) adapters: the saved files have the same keys, shapes, dtypes and config essentials,
    and each library loads the other's file with the saver's outputs (1e-5)."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, "init_weights": False, **kwargs}
    check_interop_both_ways(case, lambda lib: lib.HRAConfig(**kw), tmp_path, markers=None, essentials=ESSENTIALS,
                            tol={"atol": ATOL, "rtol": 0})


def test_default_targets_are_the_references() -> None:
    """Without ``target_modules`` the model type's table (a copy of LoRA's, as the reference's) picks the modules."""
    import peft
    from models import tiny_llama

    ours = get_peft_model(tiny_llama(), HRAConfig(task_type="CAUSAL_LM"))
    ref = peft.get_peft_model(tiny_llama(), peft.HRAConfig(task_type="CAUSAL_LM"))
    assert set(get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))
    assert set(ours.peft_config["default"].target_modules) == set(ref.peft_config["default"].target_modules)
