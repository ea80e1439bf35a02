"""Conformance: two adapters on one model -- add, set (one or both active), merge by name, delete."""

from __future__ import annotations

import pytest
import torch
from conformance_helpers import (
    FIRST,
    RTOL_MERGE,
    TOL_IDENTITY,
    TOL_MERGE,
    MethodConfig,
    adapter_layers,
    adapter_modules,
    add_adapter,
    assert_close,
    assert_differs,
    assert_unchanged,
    base_output,
    in_adapter,
    mergeable,
    output,
    snapshot,
    wrap,
)
from kind_models import NOT_LAYERWISE_ADDITIVE
from models import TaskCase

from peftkit import AdapterLayer, AdapterNotFoundError, MergeError, PeftModel
from peftkit.layers.modules_to_save import ModulesToSaveWrapper


def _two_adapters(mc: MethodConfig, case: TaskCase) -> tuple[PeftModel, torch.Tensor, torch.Tensor]:
    """A model with observable adapters "default" (active) and "other"; returns it and their outputs."""
    model = wrap(case, mc.observable(case), seed=0)
    out_a = output(model, case)
    add_adapter(model, "other", mc.observable(case), seed=1)
    model.set_adapter("other")
    out_b = output(model, case)
    model.set_adapter("default")
    return model, out_a, out_b


@pytest.mark.parametrize("mc, case", FIRST)
def test_add_adapter_keeps_active_adapter_outputs_and_trainability(mc: MethodConfig, case: TaskCase) -> None:
    model = wrap(case, mc.observable(case))
    out_a = output(model, case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    add_adapter(model, "other", mc.observable(case), seed=1)
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert list(model.peft_config) == ["default", "other"]
    assert_close(output(model, case), out_a, TOL_IDENTITY, "after add_adapter vs before")
    other = [n for n, _ in model.named_parameters() if in_adapter(n, "other", mc.spec.prefix)]
    assert other, "the new adapter holds no tensors"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable, "the new adapter must be frozen"


@pytest.mark.parametrize("mc, case", FIRST)
def test_set_adapter_switches_outputs(mc: MethodConfig, case: TaskCase) -> None:
    model, out_a, out_b = _two_adapters(mc, case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    base = base_output(case)
    assert_differs(out_b, out_a, "outputs of the two adapters")
    assert_differs(out_b, base, "outputs of 'other' and the base")
    model.set_adapter("other")
    assert model.active_adapter == "other"
    assert_close(output(model, case), out_b, TOL_IDENTITY, "'other' active again")
    model.set_adapter("default")
    assert_close(output(model, case), out_a, TOL_IDENTITY, "'default' active again")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable, "trainability not restored"


def _layer_inputs(model: PeftModel, case: TaskCase) -> dict[str, tuple]:
    """The positional inputs each adapter layer receives in a forward pass."""
    captured: dict[str, tuple] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args, name=name: captured.setdefault(name, args))
        for name, layer in adapter_layers(model)
    ]
    try:
        output(model, case)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@pytest.mark.parametrize("mc, case", [p for p in FIRST if p.values[0].spec.additive])  # IA3 multiplies
def test_two_active_adapters_add_their_updates(mc: MethodConfig, case: TaskCase) -> None:
    """With ``["default", "other"]`` active, every adapter layer computes base + delta_a + delta_b (1e-5)."""
    model, out_a, out_b = _two_adapters(mc, case)
    inputs = _layer_inputs(model, case)
    layers = dict(adapter_layers(model))
    if case.name in NOT_LAYERWISE_ADDITIVE:  # no layer's output is affine in its weights (kind_models)
        inputs, layers = {}, {}
    assert inputs.keys() == layers.keys()

    def layer_outputs() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: layers[name](*args) for name, args in inputs.items()}

    only_a = layer_outputs()
    model.base_model.set_adapter("other")
    only_b = layer_outputs()
    shared = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper) and {"default", "other"} <= set(
        m.adapter_names())]
    if shared:  # only one copy of a module can run: activating both raises, as in the reference (ValueError)
        with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
            model.base_model.set_adapter(["default", "other"])
        for wrapper in shared:
            wrapper.delete_adapter("other")  # keep one copy of the task head so that both adapters can be active
    model.base_model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    both = layer_outputs()
    with torch.no_grad():
        base = {name: layers[name].base_layer(*args) for name, args in inputs.items()}
    for name in layers:
        expected = only_a[name] + only_b[name] - base[name]
        assert_close(both[name], expected, TOL_MERGE, f"{name}: both active vs base + delta_a + delta_b", RTOL_MERGE)
    out_ab = output(model, case)
    assert_differs(out_ab, out_a, "both active vs 'default' only")
    assert_differs(out_ab, out_b, "both active vs 'other' only")


@pytest.mark.parametrize("mc, case", mergeable(FIRST))
def test_merge_adapter_by_name(mc: MethodConfig, case: TaskCase) -> None:
    """``merge_adapter(adapter_names=["other"])`` with "other" active computes what "other" computed unmerged; only
    "other" is merged."""
    model, out_a, out_b = _two_adapters(mc, case)
    model.set_adapter("other")
    model.merge_adapter(adapter_names=["other"])
    assert all(layer.merged_adapters == ["other"] for _, layer in adapter_layers(model) if layer.has_adapter("other"))
    assert_close(output(model, case), out_b, TOL_MERGE, "'other' merged vs unmerged", RTOL_MERGE)
    model.unmerge_adapter()
    model.set_adapter("default")
    assert_close(output(model, case), out_a, TOL_MERGE, "'default' after merging/unmerging 'other'", RTOL_MERGE)


def _holds(model: PeftModel, name: str) -> list[str]:
    """Every place adapter ``name`` is still referenced: layer dicts, modules_to_save copies, parameter names."""
    found = [f"{path}.{attr}" for path, module in adapter_modules(model) if isinstance(module, AdapterLayer)
             for attr in module.adapter_layer_names + module.other_param_names if name in getattr(module, attr)]
    found += [path for path, module in adapter_modules(model) if name in module.adapter_names()]
    found += [n for n in model.state_dict() if f".{name}." in n]
    return found


@pytest.mark.parametrize("mc, case", FIRST)
def test_delete_inactive_adapter(mc: MethodConfig, case: TaskCase) -> None:
    model, out_a, _ = _two_adapters(mc, case)
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert _holds(model, "other") == []
    assert model.active_adapter == "default"
    assert_close(output(model, case), out_a, TOL_IDENTITY, "after deleting the inactive adapter")


@pytest.mark.parametrize("mc, case", FIRST)
def test_delete_active_adapter_reassigns(mc: MethodConfig, case: TaskCase) -> None:
    model, _, out_b = _two_adapters(mc, case)
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]
    assert _holds(model, "default") == []
    assert model.active_adapter == "other"
    assert all(module.active_adapters == ["other"] for _, module in adapter_modules(model))
    assert_close(output(model, case), out_b, TOL_IDENTITY, "the remaining adapter's outputs")


@pytest.mark.parametrize("mc, case", FIRST)
def test_delete_unknown_adapter_raises(mc: MethodConfig, case: TaskCase) -> None:
    model, _, _ = _two_adapters(mc, case)
    before = snapshot(model, case)
    with pytest.raises(AdapterNotFoundError, match="does-not-exist") as info:
        model.delete_adapter("does-not-exist")
    assert isinstance(info.value, ValueError)
    assert "default" in str(info.value) and "other" in str(info.value), "the message lists the available adapters"
    assert_unchanged(model, case, before)


@pytest.mark.parametrize("mc, case", mergeable(FIRST))
def test_delete_merged_adapter_raises_and_changes_nothing(mc: MethodConfig, case: TaskCase) -> None:
    model, _, _ = _two_adapters(mc, case)
    model.set_adapter("other")
    model.merge_adapter()
    before = snapshot(model, case)
    merged_before = {n: list(layer.merged_adapters) for n, layer in adapter_layers(model)}
    with pytest.raises(MergeError, match="other"):
        model.delete_adapter("other")
    assert_unchanged(model, case, before)
    assert {n: list(layer.merged_adapters) for n, layer in adapter_layers(model)} == merged_before
    assert _holds(model, "other")
