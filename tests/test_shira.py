"""SHiRA (sparse high-rank adapters): the mask draw and the layer against plain formulas written here, the lean
backward, interop both ways with the reference (tiny Llama, BERT, an MLP; random and custom masks), merging, several
adapters, mixed batches, ``set_scale``, custom mask functions and typed config errors.

The generic properties (identity, merge, save/load, multi-adapter, errors) come from the conformance suite.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from method_interop import check_interop_both_ways, interop_case
from numerics import fp_tol
from torch import nn

from peftkit import ShiraConfig, get_peft_model
from peftkit.errors import ConfigError, PeftWarning, UnsupportedModuleError
from peftkit.methods.shira import ShiraLayer
from peftkit.methods.shira.sparse import _SparseLinear

ESSENTIALS = ("peft_type", "r", "mask_type", "random_seed", "init_weights", "fan_in_fan_out")


# ------------------------------------------------------------------------------------------------ plain math
def plain_mask_indices(out: int, inp: int, r: int, seed: int | None) -> torch.Tensor:
    """The paper's random mask as the reference draws it: the first ``r (in + out)`` entries of a permutation of
    ``out * in`` from a fresh generator (seeded, or its default seed), as a dense 0/1 mask read back row-major."""
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    chosen = torch.randperm(out * inp, generator=gen)[: r * (out + inp)]
    mask = torch.zeros(out * inp)
    mask[chosen] = 1.0
    rows, cols = torch.where(mask.view(out, inp) == 1.0)
    return torch.stack([rows, cols])


def plain_delta(values: torch.Tensor, indices: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    """``ΔW: (out, in)`` entry by entry: ``ΔW[rows_j, cols_j] += values_j``."""
    delta = torch.zeros(out, inp, dtype=values.dtype)
    for j in range(values.numel()):
        delta[indices[0, j], indices[1, j]] += values[j]
    return delta


def _layer(model: nn.Module, index: int = 0) -> ShiraLayer:
    return [m for m in model.modules() if isinstance(m, ShiraLayer)][index]


def _shira_mlp(r: int = 2, **kwargs: Any) -> tuple[nn.Module, nn.Linear]:
    torch.manual_seed(0)
    base = nn.Linear(12, 9)
    model = get_peft_model(nn.Sequential(base), ShiraConfig(r=r, target_modules=["0"], **kwargs))
    return model, base


@pytest.mark.parametrize("seed", [None, 0, 11])
def test_mask_is_the_papers_random_draw(seed: int | None) -> None:
    model, _ = _shira_mlp(r=2, random_seed=seed)
    indices = _layer(model).shira_indices["default"]
    assert indices.dtype == torch.int32 and tuple(indices.shape) == (2, 2 * (12 + 9))
    assert torch.equal(indices.long(), plain_mask_indices(9, 12, 2, seed))


def test_layer_output_and_gradients_match_plain_formula() -> None:
    """``y = x (W + ΔW)ᵀ + b`` and its gradients (x, values, bias) against autograd through the plain dense formula."""
    torch.manual_seed(0)
    base = nn.Linear(12, 9).double()
    model = get_peft_model(nn.Sequential(base), ShiraConfig(r=2, target_modules=["0"], init_weights=False))
    base.bias.requires_grad_(True)
    layer = _layer(model)
    layer.set_scale("default", 0.7)
    values, indices = layer.shira_weight["default"], layer.shira_indices["default"].long()
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 9, dtype=torch.float64)
    ours = layer(x)
    plain = x @ (base.weight + 0.7 * plain_delta(values, indices, 9, 12)).T + base.bias
    got = (ours, *torch.autograd.grad(ours, (x, values, base.bias), g))
    want = (plain, *torch.autograd.grad(plain, (x, values, base.bias), g))
    for a, b in zip(got, want):
        # float64, different summation orders of at most 12 products (values: 12 rows of a 12-term sum)
        torch.testing.assert_close(a, b, **fp_tol(torch.float64, 12 * 12))
    torch.testing.assert_close(layer.get_delta_weight("default"), 0.7 * plain_delta(values, indices, 9, 12).detach())


def test_sparse_linear_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    v1 = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    v2 = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    p1, p2 = torch.randperm(24, generator=gen)[:7], torch.tensor([0, 5, 5])  # flat positions; duplicates add
    i1, i2 = (torch.stack([p // 6, p % 6]).int() for p in (p1, p2))

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        return _SparseLinear.apply(x, w, b, (i1, i2), (1.5, -0.5), v1, v2)

    assert torch.autograd.gradcheck(fn, (x, w, b, v1, v2))


def test_backward_keeps_no_weight_sized_tensor() -> None:
    """The reference keeps ``W + ΔW: (out, in)`` per layer for backward; peftkit keeps ``x``, ``W`` and the values."""
    torch.manual_seed(0)
    base = nn.Linear(64, 96, bias=False)
    layer = _layer(get_peft_model(nn.Sequential(base), ShiraConfig(r=4, target_modules=["0"])))
    x = torch.randn(3, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    weight_ptr = base.weight.untyped_storage().data_ptr()
    copies = [t for t in saved if t.numel() >= 64 * 96 and t.untyped_storage().data_ptr() != weight_ptr]
    assert not copies, [tuple(t.shape) for t in copies]
    assert not [t for t in saved if t.dtype == torch.int64]  # flat positions are recomputed, not kept


def test_layers_share_the_random_mask_until_a_load_writes_indices() -> None:
    """Layers of one shape hold one indices tensor (the reference keeps a copy per layer); a load gives each layer
    its own before writing, so a file with different indices per layer loads exactly."""
    from peftkit import get_peft_model_state_dict, set_peft_model_state_dict

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 9), nn.Linear(12, 9)), ShiraConfig(r=1, target_modules=["0", "1"]))
    first, second = _layer(model, 0), _layer(model, 1)
    assert first.shira_indices["default"] is second.shira_indices["default"]
    state = get_peft_model_state_dict(model)
    shared = second.shira_indices["default"].clone()
    state["base_model.model.0.shira_indices"] = torch.stack([torch.arange(21) % 9, torch.arange(21) // 9]).int()
    set_peft_model_state_dict(model, state)
    assert torch.equal(first.shira_indices["default"], state["base_model.model.0.shira_indices"])
    assert torch.equal(second.shira_indices["default"], shared)


# ------------------------------------------------------------------------------------------------ interop
def _custom_mask(base_layer: nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
    """A deterministic structured mask: the first ``r (in + out)`` entries in row-major order."""
    out, inp = base_layer.weight.shape
    mask = torch.zeros(out * inp, dtype=base_layer.weight.dtype)
    mask[: r * (out + inp)] = 1
    return mask.view(out, inp)


INTEROP = [
    pytest.param("llama-causal", {"r": 2}, id="llama"),
    pytest.param("llama-causal", {"r": 1, "random_seed": 5}, id="llama-seed"),
    pytest.param("bert-feat", {"r": 2, "random_seed": 1}, id="bert"),
    pytest.param("custom-mlp", {"r": 1, "target_modules": ["lin0", "lin1"]}, id="mlp"),
    pytest.param("custom-mlp", {"r": 2, "mask_type": "custom"}, id="mlp-custom-mask"),
]


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Perturbed adapters: same keys/shapes/dtypes (``shira_indices`` int32 included) and config essentials; each
    library loads the other's file with the saver's outputs (1e-5). A custom mask's indices come from the file."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, **kwargs}

    def make(lib: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the custom mask_type warning
            config = lib.ShiraConfig(**kw)
        if kw.get("mask_type") == "custom":
            config.mask_fn = _custom_mask
        return config

    check_interop_both_ways(case, make, tmp_path, markers=("shira_weight",), essentials=ESSENTIALS)


# ------------------------------------------------------------------------------------------------ merging, adapters
def test_merge_unmerge_and_several_adapters() -> None:
    model, base = _shira_mlp(r=2, init_weights=False)
    model.add_adapter("other", ShiraConfig(r=1, target_modules=["0"], random_seed=3, init_weights=False))
    layer, x = _layer(model), torch.randn(5, 12)
    w0 = base.weight.detach().clone()
    deltas = {n: plain_delta(layer.shira_weight[n].detach(), layer.shira_indices[n].long(), 9, 12)
              for n in ("default", "other")}
    model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        both = model(x)
        # float32: a 12-term dot product per output, different orders
        torch.testing.assert_close(both, x @ (w0 + deltas["default"] + deltas["other"]).T + base.bias,
                                   **fp_tol(torch.float32, 12))
        model.merge_adapter()
        torch.testing.assert_close(base.weight, w0 + deltas["default"] + deltas["other"])
        torch.testing.assert_close(model(x), both, **fp_tol(torch.float32, 12))
        model.unmerge_adapter()
        torch.testing.assert_close(base.weight, w0, **fp_tol(torch.float32, 1))
        torch.testing.assert_close(model(x), both, **fp_tol(torch.float32, 12))


def test_mixed_batch_rows_use_their_own_adapter() -> None:
    model, base = _shira_mlp(r=2, init_weights=False)
    model.add_adapter("other", ShiraConfig(r=1, target_modules=["0"], random_seed=3, init_weights=False))
    x = torch.randn(3, 12)
    model.eval()
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "__base__", "other"])
        model.base_model.set_adapter("default")
        a = model(x[:1])
        model.base_model.set_adapter("other")
        c = model(x[2:])
        torch.testing.assert_close(mixed, torch.cat([a, base(x[1:2]), c]), **fp_tol(torch.float32, 12))


def test_set_scale_scales_the_update() -> None:
    model, base = _shira_mlp(r=2, init_weights=False)
    layer, x = _layer(model), torch.randn(4, 12)
    with torch.no_grad():
        full = model(x) - base(x)
        layer.set_scale("default", 0.25)
        layer.set_scale("missing", 3.0)  # ignored, as the reference
        torch.testing.assert_close(model(x) - base(x), 0.25 * full, **fp_tol(torch.float32, 12))


def test_base_layer_hooks_and_subclass_forward_are_kept() -> None:
    """The reference multiplies by ``W + ΔW`` itself, skipping the base layer's forward and its hooks (it warns);
    peftkit then computes ``base(x) + x ΔWᵀ``, so a hook on the base layer still applies."""
    model, base = _shira_mlp(r=2, init_weights=False)
    layer, x = _layer(model), torch.randn(4, 12)
    with torch.no_grad():
        delta = x @ layer.get_delta_weight("default").T
        base.register_forward_hook(lambda module, args, output: output * 2)
        # float32: 12-term dot products summed in different orders
        torch.testing.assert_close(model(x), base(x) + delta, **fp_tol(torch.float32, 12))


def test_custom_mask_function_without_kwargs_and_config_copy() -> None:
    """The reference documents ``mask_fn(base_layer, r)`` but calls it with ``bias=`` when a second adapter is added to
    a layer (a TypeError); peftkit passes only the keywords the function accepts. A copy of the config keeps it."""
    def mask_fn(base_layer: nn.Module, r: int) -> torch.Tensor:
        return _custom_mask(base_layer, r)

    def config(r: int) -> ShiraConfig:
        with pytest.warns(PeftWarning, match="mask_fn"):
            made = ShiraConfig(r=r, mask_type="first", target_modules=["0"])
        made.mask_fn = mask_fn
        return made

    assert config(1).copy(r=2).mask_fn is mask_fn
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 9)), config(1))
    model.add_adapter("other", config(2))
    layer = _layer(model)
    for name, r in (("default", 1), ("other", 2)):
        assert torch.equal(layer.shira_indices[name].long(), torch.nonzero(_custom_mask(nn.Linear(12, 9), r)).T)


# ------------------------------------------------------------------------------------------------ quantized bases
@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_quantized_linear_adds_the_update_trains_and_merges_within_the_quantization_error(quant: str) -> None:
    from method_interop import quantized_linear

    import peftkit

    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    model = get_peft_model(nn.Sequential(quantized_linear(quant, dense)),
                           ShiraConfig(r=2, target_modules=["0"], init_weights=False))
    layer = _layer(model)
    model.train()  # train mode throughout: bitsandbytes picks other kernels in eval mode
    values, indices = layer.shira_weight["default"], layer.shira_indices["default"].long()
    with torch.no_grad():
        base_out = layer.get_base_layer()(x)
        quant_error = (base_out - dense(x)).abs().max().item()
    out = model(x)
    # the quantized base output plus a 64-term float32 product with the plain ΔW
    torch.testing.assert_close(out, base_out + x @ plain_delta(values.detach(), indices, 32, 64).T,
                               **fp_tol(torch.float32, 64))
    out.pow(2).mean().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", peftkit.QuantizedMergeWarning)
        model.merge_adapter()
    with torch.no_grad():
        merged = model(x)
    # W + ΔW is re-quantized: its rounding is that of a weight of a few times W's range
    bound = 5 * quant_error * (1 + values.detach().abs().max().item())
    assert (merged - out.detach()).abs().max().item() <= bound
    model.unmerge_adapter()
    with torch.no_grad():
        assert (model(x) - out.detach()).abs().max().item() <= 2 * bound


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"), ({"r": 1.5}, "r"), ({"random_seed": "7"}, "random_seed"), ({"mask_type": 3}, "mask_type"),
    ({"init_weights": "yes"}, "init_weights"), ({"fan_in_fan_out": None}, "fan_in_fan_out"),
])
def test_config_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ShiraConfig(target_modules=["0"], **kwargs)
    assert info.value.field == field


def test_injection_errors() -> None:
    with pytest.raises(ConfigError, match="r=6") as info:  # 6 * (12 + 9) > 12 * 9
        get_peft_model(nn.Sequential(nn.Linear(12, 9)), ShiraConfig(r=6, target_modules=["0"]))
    assert info.value.field == "r"
    with pytest.warns(PeftWarning):
        config = ShiraConfig(r=1, mask_type="mine", target_modules=["0"])
    with pytest.raises(ConfigError) as info:  # no mask function: the reference fails later with a KeyError
        get_peft_model(nn.Sequential(nn.Linear(12, 9)), config)
    assert info.value.field == "mask_type"
    config.mask_fn = lambda base_layer, r, **kw: torch.ones_like(base_layer.weight)
    with pytest.raises(ConfigError) as info:
        get_peft_model(nn.Sequential(nn.Linear(12, 9)), config)
    assert info.value.field == "mask_fn"
    with pytest.raises(UnsupportedModuleError, match="torch.nn.Linear"):
        get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 2)), ShiraConfig(r=1, target_modules=["0"]))
    with pytest.warns(PeftWarning, match="fan_in_fan_out"):
        get_peft_model(nn.Sequential(nn.Linear(12, 9)), ShiraConfig(r=1, fan_in_fan_out=True, target_modules=["0"]))
