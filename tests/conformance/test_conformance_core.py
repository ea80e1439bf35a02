"""Conformance: identity at init, which tensors train (and only those change), and ``disable_adapter()``.

Parametrized over every registered method x example config x tiny model case (REFERENCE.md §4 tolerances).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from conformance_helpers import (
    ALL,
    HEAD_TASKS,
    RTOL_MERGE,
    TOL_IDENTITY,
    TOL_MERGE,
    MethodConfig,
    adapter_layers,
    assert_close,
    assert_differs,
    can_merge,
    clone_params,
    example_base_output,
    is_adapter_param,
    loss_of,
    output,
    wrap,
)
from models import TaskCase
from torch import nn

from peftkit import PeftModel, PeftWarning


@pytest.mark.parametrize("mc, case", ALL)
def test_identity_at_init(mc: MethodConfig, case: TaskCase) -> None:
    """Default init: the wrapped model computes the base output (1e-6); the non-identity init changes it."""
    base = example_base_output(mc, case)
    config = mc.config(case)
    config_before = config.to_dict()
    model = wrap(case, config)
    assert config.to_dict() == config_before, "get_peft_model modified the user's config"
    if mc.spec.identity_at_init:
        assert_close(output(model, case), base, TOL_IDENTITY)
    assert_differs(output(wrap(case, mc.observable(case)), case), base)


def expected_trainable(model: PeftModel, mc: MethodConfig) -> set[str]:
    """Adapter tensors, the active adapter's ``modules_to_save`` copies, and the biases ``bias`` selects."""
    prefix = mc.spec.prefix
    names = dict(model.named_parameters())
    expected = {n for n in names if is_adapter_param(n, prefix) or ".modules_to_save.default." in n}
    bias = mc.field("bias", "none")
    if bias == "all":
        expected |= {n for n in names if n.split(".")[-1] == "bias" and "original_module" not in n.split(".")}
    elif bias.endswith("_only"):  # "lora_only", "boft_only", ...: the adapted layers' biases
        ids = {id(p): n for n, p in names.items()}
        for _, layer in adapter_layers(model):
            b = getattr(layer.get_base_layer(), "bias", None)
            if isinstance(b, nn.Parameter):
                expected.add(ids[id(b)])
    return expected


@pytest.mark.parametrize("mc, case", ALL)
def test_requires_grad_exactly_adapter_heads_and_biases(mc: MethodConfig, case: TaskCase) -> None:
    model = wrap(case, mc.config(case))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = expected_trainable(model, mc)
    assert trainable == expected, (
        f"unexpected trainable: {sorted(trainable - expected)[:5]}; missing: {sorted(expected - trainable)[:5]}"
    )
    assert any(is_adapter_param(n, mc.spec.prefix) for n in trainable), "no adapter tensor is trainable"
    if case.task_type in HEAD_TASKS:
        heads = HEAD_TASKS[case.task_type]
        saved = [n for n in trainable if ".modules_to_save.default." in n]
        assert saved and all(n.split(".modules_to_save.")[0].split(".")[-1] in heads for n in saved), saved
        assert any(".original_module." in n for n, _ in model.named_parameters())
    else:
        assert not any("modules_to_save" in n for n, _ in model.named_parameters())
    trainable_count, total = model.get_nb_trainable_parameters()
    assert trainable_count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mc, case", ALL)
def test_optimizer_step_changes_only_trainable(mc: MethodConfig, case: TaskCase) -> None:
    """One Adam step on the model's loss: every adapter tensor (and the task head copy) changes, frozen tensors are
    bit-identical and have no gradient."""
    model = wrap(case, mc.observable(case)).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = clone_params(model)
    # Adam: its first step moves every tensor with a non-zero gradient by ~lr, however small the gradient (IA3's
    # vectors on a tiny BART encoder get gradients of ~1e-9, which an SGD step loses in float32 rounding)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    loss = loss_of(model, case)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad, frozen_with_grad[:5]
    after = clone_params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    adapter = {n for n in trainable if is_adapter_param(n, mc.spec.prefix)}
    assert adapter and adapter <= changed, f"adapter tensors unchanged: {sorted(adapter - changed)[:5]}"
    heads = [n for n in trainable if ".modules_to_save.default." in n and n.endswith("weight")]
    assert (case.task_type in HEAD_TASKS) == bool(heads)
    assert set(heads) <= changed, f"task head copy unchanged: {heads}"


def _bias_warning(mc: MethodConfig) -> contextlib.AbstractContextManager:
    """Disabling adapters warns when an adapter trains base biases (those are not undone); else no PeftWarning."""
    if mc.field("bias", "none") != "none":
        return pytest.warns(PeftWarning, match="bias")
    ctx = warnings.catch_warnings()

    @contextlib.contextmanager
    def no_peft_warning():
        with ctx:
            warnings.simplefilter("error", PeftWarning)
            yield

    return no_peft_warning()


@pytest.mark.parametrize("mc, case", ALL)
def test_disable_adapter_gives_base_output(mc: MethodConfig, case: TaskCase) -> None:
    base = example_base_output(mc, case)
    model = wrap(case, mc.observable(case))
    adapted = output(model, case)
    assert_differs(adapted, base)
    with _bias_warning(mc), model.disable_adapter():
        assert_close(output(model, case), base, TOL_IDENTITY, "disabled vs base")
    assert_close(output(model, case), adapted, TOL_IDENTITY, "after disable_adapter() vs before")
    if not can_merge(mc, case):
        return
    model.merge_adapter()
    assert_close(output(model, case), adapted, TOL_MERGE, "merged vs unmerged", RTOL_MERGE)
    with _bias_warning(mc), model.disable_adapter():
        # entering unmerges: (W + dW) - dW is W only up to fp32 rounding, hence the merge tolerance here
        assert_close(output(model, case), base, TOL_MERGE, "disabled (merged before) vs base", RTOL_MERGE)
    after = output(model, case)
    assert_close(after, adapted, TOL_MERGE, "after disable_adapter() (merged before) vs adapted", RTOL_MERGE)


@pytest.mark.parametrize("mc, case", ALL)
def test_disable_adapter_freezes_and_restores_trainability(mc: MethodConfig, case: TaskCase) -> None:
    model = wrap(case, mc.observable(case))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with _bias_warning(mc), model.disable_adapter():
        inside = {n for n, p in model.named_parameters() if p.requires_grad}
        assert not any(is_adapter_param(n, mc.spec.prefix) for n in inside)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
