"""OSF (``OSFConfig``): the top ``effective_rank`` singular directions of a linear weight stay frozen, the remaining
low part ``U_low diag(S_low) V_low`` trains with gradients projected orthogonally to the frozen subspace.

Checked against a plain implementation written here (float64 SVD), against the reference both ways (files, keys,
outputs, gradients) on a tiny Llama, a BERT encoder and a custom MLP, plus the behaviours where peftkit differs on
purpose (unmerge works; several active adapters add).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from method_interop import (
    case_model,
    case_output,
    check_interop_both_ways,
    check_mixed_batch_rows,
    interop_case,
    perturb_adapter,
)
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.osf import OSFLayer, decompose_weight_matrix, project_gradient_to_orthogonal_space
from peftkit.methods.osf.layers import _ProjectGrad, project_grad_reference
from tests.models import tiny_gpt2
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

peft = pytest.importorskip("peft")
from peft.tuners.osf import utils as ref_utils

#: same SVDs of the same weights in both libraries; the update runs through other matmul orders (two skinny products
#: against one concatenated one): a few ulp per term of the tiny models' longest reduction
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)

CONFIGS = {
    "default": {},  # half of min(out, in) frozen
    "int-pattern": {"effective_rank": 3, "rank_pattern": {"lin1|v_proj|value": 1}},
    "fraction": {"effective_rank": 0.6},
}


#: model name -> (model case of tests/models.py, targets)
MODELS = {
    "mlp": ("custom-mlp", ["lin0", "lin1"]),
    "llama": ("llama-causal", ["q_proj", "v_proj", "k_proj", "down_proj"]),
    "bert": ("bert-feat", ["query", "value", "dense"]),
}


def _base(name: str) -> nn.Module:
    return case_model(MODELS[name][0])


def _output(model: nn.Module, name: str) -> torch.Tensor:
    return case_output(model, interop_case(MODELS[name][0]))


def _perturb(model: nn.Module, seed: int = 3) -> None:
    perturb_adapter(model, ("osf_svd_params",), seed, scale=0.1)


def _build(lib, name: str, options: str, **extra) -> nn.Module:
    config = lib.OSFConfig(target_modules=MODELS[name][1], **{**CONFIGS[options], **extra})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(_base(name), config)
    _perturb(model)
    return model.eval()


# ------------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize("options", list(CONFIGS))
def test_layer_matches_plain_formula(options: str) -> None:
    """``y = (W − U₀S₀V₀ + U_low S_low V_low) x + b`` with ``U₀S₀V₀`` the low singular part of W (float64 here; the
    product of singular pairs does not depend on their signs)."""
    model = _build(peftkit, "mlp", options)
    for name, k_expected in (("lin0", {"default": 5, "int-pattern": 3, "fraction": 6}[options]),
                             ("lin1", {"default": 1, "int-pattern": 1, "fraction": 1}[options])):
        layer = getattr(model.base_model.model, name)
        assert isinstance(layer, OSFLayer) and layer.effective_rank["default"] == k_expected
        W = layer.get_base_layer().weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = k_expected
        low0 = U[:, k:] @ torch.diag(S[k:]) @ Vh[k:]
        p = {n: t.detach().double() for n, t in layer.osf_svd_params["default"].items()}
        low = p["U_low"] @ torch.diag(p["S_low"]) @ p["V_low"]
        x = torch.randn(4, W.shape[1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        expected = x @ (W - low0 + low).T + layer.get_base_layer().bias.detach().double()
        with torch.no_grad():
            got = layer(x.float())
        # float32 against float64 through reductions of length <= 20: a few ulp
        torch.testing.assert_close(got.double(), expected, **fp_tol(torch.float32, 32))


@pytest.mark.parametrize("name", ["lin0", "lin1"])  # lin0: (20, 10), U not square; lin1: (2, 20), V not square
def test_gradients_are_orthogonal_to_the_frozen_subspace(name: str) -> None:
    model = _build(peftkit, "mlp", "int-pattern")
    model.train()
    x = interop_case("custom-mlp").make_inputs(3)["x"]
    model(x=x).pow(2).sum().backward()
    layer = getattr(model.base_model.model, name)
    W = layer.get_base_layer().weight.detach().double()
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    k = layer.effective_rank["default"]
    params = layer.osf_svd_params["default"]
    dU, dV = params["U_low"].grad.double(), params["V_low"].grad.double()
    assert dU.abs().max() > 1e-4 and dV.abs().max() > 1e-4  # a real gradient
    # orthogonality in float64 of float32 gradients: a few ulp of the gradient's scale
    tol = 1e-5 * max(dU.abs().max().item(), dV.abs().max().item())
    assert (U[:, :k].T @ dU).abs().max() < tol
    assert (dV @ Vh[:k].T).abs().max() < tol
    assert params["S_low"].grad is not None


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("keep", [True, False])
def test_projection_function_matches_plain_projector(left: bool, keep: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 4, generator=gen, dtype=torch.float64))[0]
    basis = basis if left else basis.T.contiguous()
    factor = torch.randn((12, 3) if left else (3, 12), generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(factor.shape, generator=gen, dtype=torch.float64)
    _ProjectGrad.apply(factor, basis, left, keep).backward(grad)
    torch.testing.assert_close(factor.grad, project_grad_reference(grad, basis, left, keep))


def test_training_gradients_equal_the_reference_hooks() -> None:
    """Same adapter, same loss: the gradients of every OSF tensor equal the reference's (its tensor hooks)."""
    grads = {}
    for lib in (peftkit, peft):
        model = _build(lib, "llama", "int-pattern")
        model.train()
        ids = torch.tensor([[1, 5, 9, 3, 60, 7]])
        model(input_ids=ids, labels=ids).loss.backward()
        grads[lib.__name__] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["peftkit"].keys() == grads["peft"].keys()
    for n, g in grads["peftkit"].items():
        torch.testing.assert_close(g, grads["peft"][n], **TOL, msg=n)


def test_utils_match_the_reference() -> None:
    W = torch.randn(12, 7, generator=torch.Generator().manual_seed(1))
    ours, ref = decompose_weight_matrix(W, 3), ref_utils.decompose_weight_matrix(W, 3)
    assert ours.keys() == ref.keys() and ours["rank_high"] == 3
    for key in ("U_high", "S_high", "V_high", "U_low", "S_low", "V_low"):
        assert torch.equal(ours[key], ref[key]), key  # the same SVD call on the same data
        assert isinstance(ours[key], nn.Parameter) == isinstance(ref[key], nn.Parameter)
    for svd in (ours, ref):
        for key in ("U_low", "S_low", "V_low"):
            svd[key].grad = torch.ones_like(svd[key])
    project_gradient_to_orthogonal_space(ours)
    ref_utils.project_gradient_to_orthogonal_space(ref)
    for key in ("U_low", "S_low", "V_low"):
        torch.testing.assert_close(ours[key].grad, ref[key].grad, **fp_tol(torch.float32, 12))


def test_identity_at_init_and_nothing_but_the_low_factors_is_saved() -> None:
    base = _output(_base("llama"), "llama")
    model = peftkit.get_peft_model(_base("llama"), peftkit.OSFConfig(target_modules=["q_proj", "k_proj"]))
    # initial factors are the same tensors as the frozen copies: the update is U₀S₀V₀x − U₀S₀V₀x, exactly 0
    torch.testing.assert_close(_output(model, "llama"), base, atol=0, rtol=0)  # (see the comment above)
    saved = peftkit.get_peft_model_state_dict(model)
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"U_low", "S_low", "V_low"}
    assert not any("_osf_" in k for k in model.state_dict())


# ------------------------------------------------------------------------------------------------ interop


@pytest.mark.parametrize("options", list(CONFIGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_interop_both_ways(name: str, options: str, tmp_path: Path) -> None:
    """A perturbed adapter saved by either library loads in the other with the same outputs (1e-5), keys and
    config; the adapter is not identity."""
    check_interop_both_ways(MODELS[name][0], lambda lib: lib.OSFConfig(target_modules=MODELS[name][1], **CONFIGS[options]), tmp_path,
                            markers=None, perturb=_perturb, min_change=1e-3, saved=CONFIGS[options])


def test_default_targets_all_linear_on_custom_models_as_the_reference() -> None:
    ours = peftkit.get_peft_model(_base("mlp"), peftkit.OSFConfig())
    ref = peft.get_peft_model(_base("mlp"), peft.OSFConfig())
    names = lambda m, cls: sorted(n.rsplit(".", 1)[-1] for n, x in m.named_modules() if isinstance(x, cls))
    assert names(ours, OSFLayer) == names(ref, peft.tuners.osf.OSFLayer) == ["lin0", "lin1"]


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("options", list(CONFIGS))
def test_merge_unmerge_and_merge_and_unload(options: str) -> None:
    """Merging adds ``U_low S_low V_low − U₀S₀V₀``; unmerging (which the reference cannot do) restores the
    weights."""
    model = _build(peftkit, "llama", options)
    base = _output(_base("llama"), "llama")
    expected = _output(model, "llama")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    model.merge_adapter()
    # merged W + ΔW runs other kernels than the factored update: fp32 tolerance of the tiny model
    torch.testing.assert_close(_output(model, "llama"), expected, **TOL)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:  # W + ΔW − ΔW, rounded twice at the scale of W
            torch.testing.assert_close(p, weights[n], **fp_tol(torch.float32, 32))
    torch.testing.assert_close(_output(model, "llama"), expected, **TOL)
    with model.disable_adapter():
        torch.testing.assert_close(_output(model, "llama"), base, **TOL)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, OSFLayer) for m in merged.modules())
    torch.testing.assert_close(_output(merged, "llama"), expected, **TOL)


def test_two_active_adapters_add_like_their_merge() -> None:
    """The reference's forward uses only the first active adapter while its merge applies all of them; here the
    forward adds every active adapter's update, which is what merging both gives."""
    model = _build(peftkit, "mlp", "default")
    model.add_adapter("other", peftkit.OSFConfig(target_modules=["lin0", "lin1"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    both = _output(model, "mlp")
    model.set_adapter("other")
    other = _output(model, "mlp")
    model.set_adapter("default")
    default = _output(model, "mlp")
    base = _output(_base("mlp"), "mlp")
    model.base_model.set_adapter(["default", "other"])
    assert (both - default).abs().max() > 1e-3 and (both - other).abs().max() > 1e-3
    model.merge_adapter(["default", "other"])
    torch.testing.assert_close(_output(model, "mlp"), both, **TOL)
    assert (other + default - base).shape == both.shape


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("field, value", [
    ("effective_rank", 0), ("effective_rank", -2), ("effective_rank", "half"), ("init_weights", "yes"),
])
def test_bad_config_values_raise_config_error_naming_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        peftkit.OSFConfig(target_modules=["q_proj"], **{field: value})
    assert isinstance(info.value, ValueError) and info.value.field == field
    assert field in str(info.value) and repr(value) in str(info.value) and "allowed" in str(info.value)


def test_bad_rank_pattern_and_rank_resolving_to_zero_raise() -> None:
    with pytest.raises(ConfigError) as info:
        peftkit.OSFConfig(target_modules=["q_proj"], rank_pattern={"q": -1})
    assert info.value.field == "rank_pattern['q']"
    with pytest.raises(ConfigError, match=r"effective_rank=0.01.*min\(out, in\) = 2") as info:
        peftkit.get_peft_model(_base("mlp"), peftkit.OSFConfig(target_modules=["lin1"], effective_rank=0.01))
    assert info.value.field == "effective_rank"
    with pytest.raises(UnsupportedModuleError, match="OSF supports torch.nn.Linear"):
        peftkit.get_peft_model(tiny_gpt2(), peftkit.OSFConfig(target_modules=["c_attn"]))


def test_mixed_batch_routes_each_row_to_its_adapter() -> None:
    """``adapter_names=[...]`` applies each row's adapter (the reference's OSF layers ignore ``adapter_names`` and
    apply the first active adapter to every row)."""
    model = _build(peftkit, "llama", "int-pattern")
    model.add_adapter("other", peftkit.OSFConfig(target_modules=MODELS["llama"][1], init_weights=False))
    ids = torch.tensor([[1, 5, 9, 3, 60, 7], [4, 8, 2, 6, 10, 12]])
    # row-gathered inputs run the same kernels on fewer rows: fp32 tolerance of the tiny model
    mixed = check_mixed_batch_rows(model, {"input_ids": ids}, ["default", "other"], TOL)
    model.set_adapter("default")
    with torch.no_grad():  # row 1 really gets the other adapter
        assert (mixed[1] - model(input_ids=ids[1:]).logits[0]).abs().max() > 1e-3


def test_inspect_reports_the_trained_low_part(tmp_path: Path) -> None:
    """``peftkit inspect`` reports shape, trainable rank and ``‖U_low diag(S_low) V_low‖_F`` per layer."""
    from peftkit.cli.inspect_cmd import inspect_adapter

    model = _build(peftkit, "llama", "int-pattern")
    model.save_pretrained(tmp_path)
    layers = {entry["module"]: entry for entry in inspect_adapter(str(tmp_path))["layers"]}
    p = {n: t.detach().double() for n, t in model.base_model.model.model.layers[0].self_attn.k_proj
         .osf_svd_params["default"].items()}
    expected = (p["U_low"] @ torch.diag(p["S_low"]) @ p["V_low"]).norm().item()
    entry = layers["model.layers.0.self_attn.k_proj"]
    assert entry["shape"] == [16, 32] and entry["rank"] == 13  # min(16, 32) - effective_rank 3
    assert abs(entry["norm"] - expected) <= 1e-6 * expected  # float64 both ways, another summation order
