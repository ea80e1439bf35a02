"""``peftkit.module_utils``: the cheap walks and constructors behave exactly like the torch calls they replace."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from peftkit import LoraConfig, get_peft_model
from peftkit.module_utils import (
    add_child,
    freeze,
    gc_paused,
    init_module_state,
    new_module,
    parameter_grads,
    set_training,
    walk_modules,
)
from tests.models import CASES_BY_NAME


def _shared_tree() -> nn.Module:
    shared = nn.Linear(3, 3)
    inner = nn.Sequential(shared, nn.ReLU(), nn.Sequential(nn.Linear(3, 2), shared))
    root = nn.Module()
    root.a = inner
    root.b = shared  # reached again: listed once, at its first place
    root.c = None
    root.d = nn.ModuleDict({"x": nn.Linear(2, 2), "y": nn.Identity()})
    return root


@pytest.mark.parametrize("case", ["llama-causal", "t5-seq2seq", "gpt2-causal", "custom-conv2d"])
def test_walk_modules_equals_named_modules(case):
    model = get_peft_model(CASES_BY_NAME[case].build(), LoraConfig(target_modules=CASES_BY_NAME[case].target_modules))
    assert [(n, id(m)) for n, m in walk_modules(model)] == [(n, id(m)) for n, m in model.named_modules()]


def test_walk_modules_dedupes_like_named_modules_and_stops_at_leaves():
    root = _shared_tree()
    assert [(n, id(m)) for n, m in walk_modules(root)] == [(n, id(m)) for n, m in root.named_modules()]
    names = [n for n, _ in walk_modules(root, leaves=(nn.Sequential, nn.ModuleDict))]
    assert names == ["", "a", "b", "d"]


@pytest.mark.parametrize("cls", [nn.ModuleDict, nn.ParameterDict, nn.Identity, nn.Module])
def test_new_module_has_the_constructor_state_with_fresh_containers(cls):
    made, real = new_module(cls), cls()
    assert type(made) is cls
    assert vars(made).keys() == vars(real).keys()
    for key, value in vars(real).items():
        assert type(vars(made)[key]) is type(value) and vars(made)[key] == value
    other = new_module(cls)
    for key, value in vars(made).items():
        if isinstance(value, (dict, set)):
            assert value is not vars(other)[key]  # never shared between instances
    if cls is nn.ParameterDict:
        made["w"] = nn.Parameter(torch.ones(2))
        assert list(made.keys()) == ["w"] and "w" not in other
        assert [n for n, _ in made.named_parameters()] == ["w"]


def test_new_module_falls_back_to_the_constructor_for_stateful_classes():
    class WithState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = 3.0  # not a flag or an empty container: no blueprint

    made = new_module(WithState)
    assert made.scale == 3.0 and vars(made).keys() == vars(WithState()).keys()


def test_init_module_state_matches_module_init():
    module = nn.Linear.__new__(nn.Linear)
    init_module_state(module)
    real = vars(nn.Module())
    assert {k: type(v) for k, v in vars(module).items()} == {k: type(v) for k, v in real.items()}
    module.weight = nn.Parameter(torch.ones(2, 2))
    assert [n for n, _ in module.named_parameters()] == ["weight"]


def test_add_child_registers_and_keeps_add_module_checks_and_hooks():
    holder = nn.ModuleDict()
    add_child(holder, "a", nn.Identity())
    assert list(holder.keys()) == ["a"]
    with pytest.raises(KeyError):
        add_child(holder, "a.b", nn.Identity())
    seen = []
    handle = torch_module.register_module_module_registration_hook(lambda mod, name, sub: seen.append(name))
    try:
        add_child(holder, "c", nn.Identity())
    finally:
        handle.remove()
    assert seen == ["c"] and list(holder.keys()) == ["a", "c"]


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_restores_the_collector_state_also_on_error(enabled):
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        with gc_paused():
            assert not gc.isenabled()
        assert gc.isenabled() is enabled
        with pytest.raises(RuntimeError), gc_paused():
            raise RuntimeError("boom")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_set_training_sets_flags_and_calls_overridden_train():
    calls = []

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)

        def train(self, mode: bool = True) -> Custom:
            calls.append(mode)
            return super().train(mode)

    tree = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(0.1), Custom()))
    set_training(tree, False)
    assert all(not m.training for m in tree.modules()) and calls == [False]
    set_training(tree, True)
    assert all(m.training for m in tree.modules()) and calls == [False, True]


def test_adapted_model_train_eval_reach_every_module():
    tc = CASES_BY_NAME["llama-causal"]
    model = get_peft_model(tc.build(), LoraConfig(target_modules=tc.target_modules, lora_dropout=0.1))
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="boolean"):
        next(m for m in model.modules() if hasattr(m, "lora_A")).train("yes")


def test_freeze_and_parameter_grads_match_requires_grad():
    root = _shared_tree()
    root.d["x"].weight.requires_grad_(False)
    grads = parameter_grads(root)
    assert [(id(p), g) for p, g in grads] == [(id(p), p.requires_grad) for p in root.parameters()]
    freeze(root)
    assert not any(p.requires_grad for p in root.parameters())
