"""RoAd (``RoadConfig``): the rotation math against a dense plain implementation, interop with the reference both
ways (tiny Llama, BERT, a custom MLP), merge/unmerge, mixed batches, what autograd keeps, typed config errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from method_interop import (
    case_model,
    case_output,
    check_interop_both_ways,
    check_mixed_batch_rows,
    interop_case,
    perturb_adapter,
    quantized_linear,
)
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.road import RoadLayer
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")

VARIANTS = ["road_1", "road_2", "road_4"]
LLAMA = "llama-causal"  # the model case (tests/models.py) of the Llama tests
#: both libraries run the same model with their own elementwise rotation code: a few ulp per term of the longest
#: reductions of the tiny models (tests/numerics.py); tighter than the issue's 1e-5
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)


# ------------------------------------------------------------------------------------------------ plain reference


def plain_rotation_matrix(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The dense ``R: (out, out)`` of the paper, element by element: in group ``g`` feature ``a = g*G + j`` pairs
    with ``b = a + G/2``; row ``a`` is ``[α cos θ, -α sin θ]`` and row ``b`` ``[α sin θ, α cos θ]`` over columns
    ``(a, b)``, with the variant's choice of which stored entry gives each ``θ`` / ``α``."""
    n = {"road_1": 2, "road_2": 1, "road_4": 0.5}[variant]
    out = int(theta.numel() * n)
    h = group_size // 2
    R = torch.zeros(out, out, dtype=torch.float64)
    t, s = theta.double(), alpha.double()
    for g in range(out // group_size):
        for j in range(h):
            a, b = g * group_size + j, g * group_size + j + h
            if variant == "road_1":  # one (θ, α) per pair
                k = g * h + j
                ca, sa, sb, cb = (s[k] * torch.cos(t[k]), s[k] * torch.sin(t[k]),
                                  s[k] * torch.sin(t[k]), s[k] * torch.cos(t[k]))
            elif variant == "road_2":  # one (θ, α) per feature
                ca, sa = s[a] * torch.cos(t[a]), s[a] * torch.sin(t[a])
                cb, sb = s[b] * torch.cos(t[b]), s[b] * torch.sin(t[b])
            else:  # road_4: per group [cos entries (G), sin entries (G)]
                base = 2 * g * group_size
                ca, cb = s[base + j] * torch.cos(t[base + j]), s[base + h + j] * torch.cos(t[base + h + j])
                sa = s[base + group_size + j] * torch.sin(t[base + group_size + j])
                sb = s[base + group_size + h + j] * torch.sin(t[base + group_size + h + j])
            R[a, a], R[a, b], R[b, a], R[b, b] = ca, -sa, sb, cb
    return R


def _road_layers(model: nn.Module) -> list[RoadLayer]:
    return [m for m in model.modules() if isinstance(m, RoadLayer)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_output_is_dense_rotation_of_base_output(variant: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 16)
    model = peftkit.get_peft_model(nn.Sequential(base), peftkit.RoadConfig(
        variant=variant, group_size=8, target_modules=["0"], init_weights=False))
    layer = _road_layers(model)[0]
    x = torch.randn(3, 5, 12)
    R = plain_rotation_matrix(variant, 8, layer.road_theta["default"].detach(), layer.road_alpha["default"].detach())
    expected = (x.double() @ base.weight.double().T + base.bias.double()) @ R.T
    # float32 layer against a float64 reference: 12-term dot product plus a 2-term rotation per output
    torch.testing.assert_close(layer(x).double(), expected, **fp_tol(torch.float32, 14))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("y_grad", [True, False], ids=["y-grad", "y-frozen"])
def test_fast_rotation_matches_plain_autograd_in_values_and_gradients(variant: str, y_grad: bool) -> None:
    from peftkit.methods.road.rotation import apply_road, apply_road_reference, road_coefficients

    size = {"road_1": 12, "road_2": 24, "road_4": 48}[variant]
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(size, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = (1 + 0.5 * torch.randn(size, generator=gen, dtype=torch.float64)).requires_grad_()
    y = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64, requires_grad=y_grad)
    grad = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64)
    results = []
    for fn in (apply_road, apply_road_reference):
        out = fn(y, *road_coefficients(variant, 8, theta, alpha))
        inputs = [theta, alpha] + ([y] if y_grad else [])
        results.append((out, torch.autograd.grad(out, inputs, grad)))
    (fast, fast_grads), (plain, plain_grads) = results
    # float64, 2-term sums forward and 15-term row sums backward: both sides round differently
    torch.testing.assert_close(fast, plain, **fp_tol(torch.float64, 2))
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, **fp_tol(torch.float64, 16))
    assert torch.autograd.gradcheck(lambda t, a: apply_road(y.detach(), *road_coefficients(variant, 8, t, a)),
                                    (theta, alpha))


def test_two_active_adapters_compose_in_order() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 8, bias=False)
    model = peftkit.get_peft_model(nn.Sequential(base), peftkit.RoadConfig(
        variant="road_2", group_size=4, target_modules=["0"], init_weights=False))
    model.add_adapter("b", peftkit.RoadConfig(variant="road_1", group_size=8, target_modules=["0"],
                                              init_weights=False))
    model.base_model.set_adapter(["default", "b"])
    layer = _road_layers(model)[0]
    ra = plain_rotation_matrix("road_2", 4, layer.road_theta["default"].detach(), layer.road_alpha["default"].detach())
    rb = plain_rotation_matrix("road_1", 8, layer.road_theta["b"].detach(), layer.road_alpha["b"].detach())
    x = torch.randn(4, 8)
    expected = x.double() @ base.weight.double().T @ ra.T @ rb.T
    torch.testing.assert_close(layer(x).double(), expected, **fp_tol(torch.float32, 12))


def test_identity_at_init_is_exact() -> None:
    model = case_model(LLAMA)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
        peft_model = peftkit.get_peft_model(model, peftkit.RoadConfig(group_size=8, target_modules=["q_proj", "v_proj"]))
        torch.testing.assert_close(peft_model(ids).logits, expected, atol=0, rtol=0)  # y * 1 - y_b * 0 == y


# ------------------------------------------------------------------------------------------------ interop


#: model case (tests/models.py) -> (target_modules, group_size); every variant runs on the Llama case
INTEROP_MODELS = {
    LLAMA: (["q_proj", "v_proj", "up_proj"], 8),
    "bert-feat": (["query", "value", "intermediate.dense"], 4),
    "custom-mlp": (["lin0", "lin1"], 2),
}
INTEROP = [pytest.param(m, v, id=f"{m}-{v}") for m in INTEROP_MODELS for v in VARIANTS if m == LLAMA or v == "road_4"]


def _perturb(model: nn.Module, seed: int = 3) -> None:
    perturb_adapter(model, ("road_",), seed)


def _config(lib, name: str, variant: str):
    targets, group_size = INTEROP_MODELS[name]
    return lib.RoadConfig(variant=variant, group_size=group_size, target_modules=targets)


@pytest.mark.parametrize(("name", "variant"), INTEROP)
def test_interop_both_ways(name: str, variant: str, tmp_path) -> None:
    """Perturbed adapters: the same saved keys, shapes, dtypes and config essentials, and each library loads the
    other's file with the saver's outputs (1e-5); the adapter is not identity."""
    check_interop_both_ways(name, lambda lib: _config(lib, name, variant), tmp_path, markers=("road_",),
                            essentials=("variant", "group_size", "init_weights"), min_change=1e-3)


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_and_merge_and_unload_match_unmerged_outputs(variant: str) -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, variant)).eval()
    _perturb(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    expected = case_output(model, interop_case(LLAMA))
    model.merge_adapter()
    torch.testing.assert_close(case_output(model, interop_case(LLAMA)), expected, **TOL)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:  # R⁻¹ (R W): one rounding of each 2-term product, twice
            torch.testing.assert_close(p.detach(), weights[n], **fp_tol(torch.float32, 4))
    torch.testing.assert_close(case_output(model, interop_case(LLAMA)), expected, **TOL)
    merged = model.merge_and_unload()
    assert not _road_layers(merged)
    torch.testing.assert_close(case_output(merged, interop_case(LLAMA)), expected, **TOL)


def test_merge_matches_reference_merge() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, "road_4")).eval()
    _perturb(model)
    ref = peft.get_peft_model(case_model(LLAMA), _config(peft, LLAMA, "road_4")).eval()
    ref.load_state_dict(model.state_dict())
    ours, theirs = model.merge_and_unload(), ref.merge_and_unload()
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        # R W by rows (2 terms) here, by a dense matmul (out terms, all but 2 zero) there
        torch.testing.assert_close(p, q, **fp_tol(torch.float32, 4), msg=n)


def test_merging_one_of_two_active_adapters_keeps_the_other_applied() -> None:
    """Reference trap: once any adapter of a layer is merged, its RoAd forward skips every other active adapter
    (``elif self.merged: base_layer(x)``), so merging one of two active adapters silently drops the other."""
    torch.manual_seed(0)
    model = peftkit.get_peft_model(nn.Sequential(nn.Linear(8, 8)), peftkit.RoadConfig(
        group_size=4, target_modules=["0"], init_weights=False))
    model.add_adapter("other", peftkit.RoadConfig(group_size=4, target_modules=["0"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(2, 8)
    with torch.no_grad():
        both = model(x)
        model.base_model.merge_adapter(["default"])
        # R_other (R_default W) x: the merged weight has one more rounding per element (2-term sums)
        torch.testing.assert_close(model(x), both, **fp_tol(torch.float32, 8 + 4))
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), both, **fp_tol(torch.float32, 8 + 4))


def test_safe_merge_refuses_non_finite_and_leaves_weights() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, "road_1")).eval()
    layer = _road_layers(model)[0]
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.road_alpha["default"][0] = float("inf")
    with pytest.raises(peftkit.MergeError, match="default"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged


# ------------------------------------------------------------------------------------------------ mixed batches


def test_mixed_batch_rows_match_single_adapter_runs_and_reference(tmp_path) -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, "road_2")).eval()
    _perturb(model, seed=3)
    model.add_adapter("other", _config(peftkit, LLAMA, "road_1"))
    _perturb(model, seed=4)
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["other", "__base__", "default"]
    mixed = check_mixed_batch_rows(model, {"input_ids": ids}, names, TOL)
    model.save_pretrained(str(tmp_path))
    ref = peft.PeftModel.from_pretrained(case_model(LLAMA), str(tmp_path)).eval()
    ref.load_adapter(str(tmp_path / "other"), adapter_name="other")
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids, adapter_names=names).logits, mixed, **TOL)


# ------------------------------------------------------------------------------------------------ memory


def test_autograd_keeps_only_the_base_output_per_layer() -> None:
    """The reference keeps ``y`` and ``rotate_half(y)`` for backward; peftkit's views of ``y`` keep ``y`` only."""
    torch.manual_seed(0)
    base = nn.Linear(64, 128, bias=False).requires_grad_(False)
    layer = peftkit.get_peft_model(nn.Sequential(base), peftkit.RoadConfig(
        variant="road_2", group_size=8, target_modules=["0"], init_weights=False)).base_model.model[0]
    x = torch.randn(32, 64)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    output_bytes = 32 * 128 * 4
    big = [n for n in storages.values() if n >= output_bytes]
    assert len(big) == 1, storages  # the base output y, once
    assert layer.road_theta["default"].grad is not None


# ------------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(("kwargs", "field", "reference_raises"), [
    ({"variant": "road_3"}, "variant", True),
    ({"group_size": 3}, "group_size", True),
    ({"group_size": 0}, "group_size", True),
    ({"group_size": -2}, "group_size", True),
    ({"group_size": 4.0}, "group_size", False),  # the reference accepts a float, then fails in reshape
    ({"init_weights": "yes"}, "init_weights", False),  # the reference treats any truthy value as True
])
def test_bad_config_values_raise_typed_errors_naming_the_field(kwargs: dict, field: str,
                                                                reference_raises: bool) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        peftkit.RoadConfig(**kwargs)
    assert isinstance(info.value, ValueError)  # the reference raises ValueError where it checks
    if reference_raises:
        with pytest.raises(ValueError):  # the reference names the value in its own words
            peft.RoadConfig(**kwargs)


def test_group_size_must_divide_out_features() -> None:
    with pytest.raises(ConfigError, match=r"group_size.*out_features \(2\).*lin1"):
        peftkit.get_peft_model(case_model("custom-mlp"), peftkit.RoadConfig(group_size=4, target_modules=["lin1"]))


def test_non_linear_target_is_refused() -> None:
    model = nn.Sequential(nn.Embedding(10, 8))
    with pytest.raises(UnsupportedModuleError, match="RoAd supports torch.nn.Linear"):
        peftkit.get_peft_model(model, peftkit.RoadConfig(group_size=4, target_modules=["0"]))


def test_inspect_measures_the_rotation_from_the_file(tmp_path) -> None:
    from peftkit.cli.inspect_cmd import inspect_adapter

    model = peftkit.get_peft_model(case_model("custom-mlp"), peftkit.RoadConfig(variant="road_4", group_size=4, target_modules=["lin0"]))
    _perturb(model)
    model.save_pretrained(str(tmp_path))
    layer = _road_layers(model)[0]
    R = plain_rotation_matrix("road_4", 4, layer.road_theta["default"].detach(), layer.road_alpha["default"].detach())
    (info,) = inspect_adapter(str(tmp_path))["layers"]
    assert info["shape"] == [20, 20] and info["rank"] is None
    assert math.isclose(info["norm"], float((R - torch.eye(20, dtype=R.dtype)).norm()), rel_tol=1e-6)


def test_mixed_model_refuses_road_as_the_reference() -> None:
    with pytest.raises(ConfigError, match="ROAD"):
        peftkit.get_peft_model(case_model("custom-mlp"), peftkit.RoadConfig(group_size=2, target_modules=["lin0"]), mixed=True)
    with pytest.raises(ValueError, match="ROAD"):
        peft.get_peft_model(case_model("custom-mlp"), peft.RoadConfig(group_size=2, target_modules=["lin0"]), mixed=True)


def test_default_targets_are_lora_table() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), peftkit.RoadConfig(group_size=8))
    assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}
    layers = _road_layers(model)
    assert {type(m.get_base_layer()) for m in layers} == {nn.Linear} and len(layers) == 4  # 2 layers x (q, v)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(2 * (m.out_features // 2) for m in layers)  # road_1: theta and alpha, out / 2 each


# ------------------------------------------------------------------------------------------------ quantized bases


@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_quantized_linear_rotates_its_output_trains_and_merges_within_the_quantization_error(quant: str) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    model = peftkit.get_peft_model(nn.Sequential(quantized_linear(quant, dense)), peftkit.RoadConfig(
        variant="road_2", group_size=8, target_modules=["0"], init_weights=False))
    layer = _road_layers(model)[0]
    model.train()  # train mode throughout: bitsandbytes picks other kernels in eval mode
    with torch.no_grad():
        base_out = layer.get_base_layer()(x)
        quant_error = (base_out - dense(x)).abs().max().item()
    R = plain_rotation_matrix("road_2", 8, layer.road_theta["default"].detach(), layer.road_alpha["default"].detach())
    out = model(x)
    torch.testing.assert_close(out.double(), base_out.double() @ R.T, **fp_tol(torch.float32, 2))
    out.pow(2).mean().backward()
    assert layer.road_theta["default"].grad.abs().sum() > 0 and layer.road_alpha["default"].grad.abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", peftkit.QuantizedMergeWarning)
        model.merge_adapter()
    with torch.no_grad():
        merged = model(x)
    # R W is re-quantized: its rounding is that of W scaled by the largest row sum of |R|
    bound = 5 * quant_error * R.abs().sum(1).max().item()
    assert (merged - out.detach()).abs().max().item() <= bound
    model.unmerge_adapter()
    with torch.no_grad():
        assert (model(x) - out.detach()).abs().max().item() <= 2 * bound
