"""Conformance: ``merge_adapter`` / ``unmerge_adapter`` / ``merge_and_unload`` / ``unload`` equivalences (1e-5 in
fp32), idempotent merging, and ``safe_merge`` refusing NaN without touching the base weights."""

from __future__ import annotations

import pytest
import torch
from conformance_helpers import (
    ALL,
    FIRST,
    RTOL_MERGE,
    TOL_IDENTITY,
    TOL_MERGE,
    MethodConfig,
    adapter_layers,
    adapter_modules,
    adapter_param_names,
    assert_close,
    assert_differs,
    base_model,
    base_output,
    can_merge,
    clone_params,
    example_base_output,
    is_adapter_param,
    mergeable,
    output,
    perturb,
    perturb_trainable,
    wrap,
)
from models import TaskCase

from peftkit import MergeError, PeftModel, PeftWarning


def _base_params(model: PeftModel, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor that is not an adapter tensor (base weights, original modules, modules_to_save copies)."""
    return {n: p for n, p in clone_params(model).items() if not is_adapter_param(n, prefix)}


def _merged_layers(model: PeftModel) -> list[str]:
    return [n for n, layer in adapter_layers(model) if layer.merged_adapters]


@pytest.mark.parametrize("mc, case", ALL)
def test_merge_then_unmerge_preserves_outputs(mc: MethodConfig, case: TaskCase) -> None:
    model = wrap(case, mc.observable(case))
    perturb_trainable(model)
    unmerged = output(model, case)
    if not can_merge(mc, case):
        with pytest.raises(MergeError):
            model.merge_adapter()
        return
    weights = _base_params(model, mc.spec.prefix)
    model.merge_adapter()
    holders = [n for n, layer in adapter_layers(model) if layer.has_adapter("default")]
    assert holders and _merged_layers(model) == holders
    assert all(layer.merged for _, layer in adapter_layers(model))
    assert_close(output(model, case), unmerged, TOL_MERGE, "merged vs unmerged", RTOL_MERGE)
    model.unmerge_adapter()
    assert _merged_layers(model) == []
    assert_close(output(model, case), unmerged, TOL_MERGE, "after unmerge vs before merge", RTOL_MERGE)
    after = _base_params(model, mc.spec.prefix)
    for name, tensor in weights.items():
        assert_close(after[name], tensor, TOL_MERGE, f"{name} after merge + unmerge", RTOL_MERGE)


@pytest.mark.parametrize("mc, case", mergeable(ALL))
def test_merge_and_unload_returns_plain_model(mc: MethodConfig, case: TaskCase) -> None:
    """No adapter layer, no ``modules_to_save`` wrapper, no ``peft_config``; outputs (trained head copy included)
    are those of the adapted model; the parameter count is the base's."""
    model = wrap(case, mc.observable(case))
    perturb_trainable(model)
    adapted = output(model, case)
    fresh = base_model(case)
    merged = model.merge_and_unload()
    assert type(merged) is type(fresh)
    assert adapter_modules(merged) == []
    assert not hasattr(merged, "peft_config")
    assert {n: type(m) for n, m in merged.named_modules()} == {n: type(m) for n, m in fresh.named_modules()}
    assert {n: p.shape for n, p in merged.named_parameters()} == {n: p.shape for n, p in fresh.named_parameters()}
    assert_close(output(merged, case), adapted, TOL_MERGE, "merge_and_unload vs adapted", RTOL_MERGE)


@pytest.mark.parametrize("mc, case", ALL)
def test_unload_restores_base(mc: MethodConfig, case: TaskCase) -> None:
    """``unload()`` gives the base outputs and the original module types (the original head, not the copy)."""
    fresh = base_model(case)
    base = example_base_output(mc, case)  # KaSA: unload() keeps the truncated base
    model = wrap(case, mc.observable(case))
    perturb(model, adapter_param_names(model, "default", mc.spec.prefix))  # adapter and head copy, not biases
    assert_differs(output(model, case), base)
    unloaded = model.unload()
    assert adapter_modules(unloaded) == [] and not hasattr(unloaded, "peft_config")
    assert {n: type(m) for n, m in unloaded.named_modules()} == {n: type(m) for n, m in fresh.named_modules()}
    assert_close(output(unloaded, case), base, TOL_IDENTITY, "unload() vs base")


@pytest.mark.parametrize("mc, case", mergeable(FIRST))
def test_unload_after_merge_restores_base(mc: MethodConfig, case: TaskCase) -> None:
    base = base_output(case)
    model = wrap(case, mc.observable(case))
    model.merge_adapter()
    assert_close(output(model.unload(), case), base, TOL_MERGE, "unload() after merge vs base", RTOL_MERGE)


@pytest.mark.parametrize("mc, case", mergeable(FIRST))
def test_merge_twice_equals_once_and_warns(mc: MethodConfig, case: TaskCase) -> None:
    model = wrap(case, mc.observable(case))
    model.merge_adapter()
    once_params, once_out = clone_params(model), output(model, case)
    with pytest.warns(PeftWarning, match="already merged"):
        model.merge_adapter()
    twice = clone_params(model)
    assert all(torch.equal(once_params[n], twice[n]) for n in once_params)
    assert_close(output(model, case), once_out, TOL_IDENTITY, "merged twice vs once")
    assert all(layer.merged_adapters.count("default") <= 1 for _, layer in adapter_layers(model))


def _poison_last_adapter_tensor(model: PeftModel, prefix: str) -> str:
    """Put a NaN into the last adapter "B" tensor (the last adapter tensor if none is named so) of ``model``."""
    names = [n for n in adapter_param_names(model, "default", prefix) if is_adapter_param(n, prefix)]
    b_names = [n for n in names if any(p.startswith(prefix) and "B" in p for p in n.split("."))]
    name = (b_names or names)[-1]
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = float("nan")
    return name


@pytest.mark.parametrize("mc, case", mergeable(FIRST))
def test_safe_merge_with_nan_raises_and_changes_nothing(mc: MethodConfig, case: TaskCase) -> None:
    model = wrap(case, mc.observable(case))
    poisoned = _poison_last_adapter_tensor(model, mc.spec.prefix)
    before = _base_params(model, mc.spec.prefix)
    modules_before = {n: type(m) for n, m in model.named_modules()}
    for call in (lambda: model.merge_adapter(safe_merge=True), lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(MergeError, match="NaN"):
            call()
        assert _merged_layers(model) == [], f"layers merged despite NaN in {poisoned}"
        after = _base_params(model, mc.spec.prefix)
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        assert not changed, f"base weights changed by a refused merge: {changed[:5]}"
        assert {n: type(m) for n, m in model.named_modules()} == modules_before
        assert "default" in model.peft_config
