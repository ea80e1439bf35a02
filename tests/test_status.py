"""Adapter status reports (``peftkit.status``): ``get_layer_status`` / ``get_model_status``.

Properties:
- the values for a tiny Llama with two adapters (one merged, one active), inside ``disable_adapter()``, with a
  ``modules_to_save`` head and on injected models are the stated ones, and every field equals what the reference's
  functions report for the same setup;
- a summary field is ``"irregular"`` exactly when the layers disagree (trainability, active adapters, enabled
  state, merged state), as in the reference;
- documented difference: a merged adapter on a model with ``modules_to_save`` is reported merged (the reference
  says ``"irregular"`` because the head wrapper never merges).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from models import CASES_BY_NAME, MLP, TaskCase

import peftkit
from peftkit import (
    ConfigError,
    LoraConfig,
    TunerLayerStatus,
    TunerModelStatus,
    get_layer_status,
    get_model_status,
    get_peft_model,
    inject_adapter_in_model,
)

LLAMA = CASES_BY_NAME["llama-causal"]
LLAMA_CLS = CASES_BY_NAME["llama-seqcls"]
LAYER_FIELDS = ["name", "module_type", "enabled", "active_adapters", "merged_adapters", "requires_grad",
                "available_adapters", "devices", "quantization_backend"]
MODEL_FIELDS = ["base_model_type", "adapter_model_type", "peft_types", "trainable_params", "total_params",
                "num_adapter_layers", "enabled", "active_adapters", "merged_adapters", "requires_grad",
                "available_adapters", "devices", "quantization_backend"]


def _ref():
    return pytest.importorskip("peft")


def _two_adapters(lib, case: TaskCase, merge: bool = True):
    """Adapter ``first`` (r=4) and ``second`` (r=2) on ``case``'s model; ``second`` active and trainable, ``first`` merged."""
    torch.manual_seed(0)
    kwargs = {"target_modules": case.target_modules, "r": 4, "lora_alpha": 8, "task_type": case.task_type}
    model = lib.get_peft_model(case.build(), lib.LoraConfig(**kwargs), adapter_name="first")
    model.add_adapter("second", lib.LoraConfig(**{**kwargs, "r": 2}))
    if lib is peftkit:
        model.set_adapter("second", inference_mode=False)  # peftkit keeps it frozen unless asked; the reference trains it
    else:
        model.set_adapter("second")
    if merge:
        model.base_model.merge_adapter(["first"])
    return model


def _ref_status(model):
    from peft.peft_model import get_layer_status as ref_layers
    from peft.peft_model import get_model_status as ref_model

    return dataclasses.asdict(ref_model(model)), [dataclasses.asdict(s) for s in ref_layers(model)]


def _status(model):
    return dataclasses.asdict(get_model_status(model)), [dataclasses.asdict(s) for s in get_layer_status(model)]


# ---------------------------------------------------------------------------------------------- fields
def test_dataclass_fields_are_the_references():
    assert [f.name for f in dataclasses.fields(TunerLayerStatus)] == LAYER_FIELDS
    assert [f.name for f in dataclasses.fields(TunerModelStatus)] == MODEL_FIELDS
    _ref()
    from peft.peft_model import TunerLayerStatus as RefLayer
    from peft.peft_model import TunerModelStatus as RefModel

    assert [f.name for f in dataclasses.fields(RefLayer)] == LAYER_FIELDS
    assert [f.name for f in dataclasses.fields(RefModel)] == MODEL_FIELDS


def test_two_adapters_one_merged_one_active_values():
    model = _two_adapters(peftkit, LLAMA)
    status = model.get_model_status()
    trainable, total = model.get_nb_trainable_parameters()
    assert dataclasses.asdict(status) == {
        "base_model_type": "LlamaForCausalLM",
        "adapter_model_type": "LoraModel",
        "peft_types": {"first": "LORA", "second": "LORA"},
        "trainable_params": trainable,
        "total_params": total,
        "num_adapter_layers": 4,  # q_proj and v_proj in 2 layers
        "enabled": True,
        "active_adapters": ["second"],
        "merged_adapters": ["first"],
        "requires_grad": {"first": False, "second": True},
        "available_adapters": ["first", "second"],
        "devices": {"first": ["cpu"], "second": ["cpu"]},
        "quantization_backend": None,
    }
    assert trainable == 2 * (2 * (32 + 32) + 2 * (32 + 16))  # second: r=2 on q (32->32) and v (32->16), in 2 layers
    layers = model.get_layer_status()
    assert [s.name for s in layers] == [f"model.model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj",
                                                                                                         "v_proj")]
    assert {s.module_type for s in layers} == {"lora.Linear"}
    assert all(s.merged_adapters == ["first"] and s.active_adapters == ["second"] for s in layers)
    assert get_model_status(model.base_model) == status  # the tuner reports the same
    with model.disable_adapter():
        assert model.get_model_status().enabled is False
        assert {s.enabled for s in model.get_layer_status()} == {False}
    assert model.get_model_status().enabled is True


SETUPS: dict[str, Callable] = {
    "single": lambda lib: lib.get_peft_model(LLAMA.build(), lib.LoraConfig(target_modules=["q_proj", "v_proj"])),
    "two-merged-active": lambda lib: _two_adapters(lib, LLAMA),
    "seqcls-two-adapters": lambda lib: _two_adapters(lib, LLAMA_CLS, merge=False),
}


@pytest.mark.parametrize("disabled", [False, True], ids=["enabled", "disabled"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_same_values_as_the_reference(setup, disabled):
    peft = _ref()
    results = []
    for lib in (peft, peftkit):
        torch.manual_seed(0)
        model = SETUPS[setup](lib)
        if disabled:
            with model.disable_adapter():
                results.append(_ref_status(model) if lib is peft else _status(model))
        else:
            results.append(_ref_status(model) if lib is peft else _status(model))
    (ref_model, ref_layers), (model_status, layer_status) = results
    assert model_status == ref_model
    assert layer_status == ref_layers
    if setup == "seqcls-two-adapters":
        assert layer_status[-1]["module_type"] == "ModulesToSaveWrapper" and model_status["num_adapter_layers"] == 5


def test_merged_adapter_with_modules_to_save_is_reported_merged():
    """Documented difference: the head wrapper never merges, so it does not make ``merged_adapters`` irregular."""
    model = _two_adapters(peftkit, LLAMA_CLS)
    status = model.get_model_status()
    assert status.merged_adapters == ["first"]
    assert model.get_layer_status()[-1].merged_adapters == []  # the score head
    peft = _ref()
    torch.manual_seed(0)
    assert _ref_status(_two_adapters(peft, LLAMA_CLS))[0]["merged_adapters"] == "irregular"


def test_disable_adapter_freezes_head_copies_and_restores():
    """Inside ``disable_adapter()`` nothing trains (the head copies too, as in the reference); on exit it all returns."""
    model = _two_adapters(peftkit, LLAMA_CLS, merge=False)
    before = model.get_model_status()
    assert before.trainable_params > 0 and before.requires_grad == {"first": False, "second": True}
    with model.disable_adapter():
        inside = model.get_model_status()
        assert (inside.trainable_params, inside.requires_grad) == (0, {"first": False, "second": False})
    assert model.get_model_status() == before


# ---------------------------------------------------------------------------------------------- irregular
def _first_layer(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


IRREGULAR_CASES: dict[str, tuple[str, Callable]] = {
    "requires_grad": ("requires_grad", lambda layer: layer.lora_A["first"].weight.requires_grad_(False)),
    "active_adapters": ("active_adapters", lambda layer: layer.set_adapter(["first", "second"])),
    "enabled": ("enabled", lambda layer: layer.enable_adapters(False)),
    "merged_adapters": ("merged_adapters", lambda layer: layer.merge(adapter_names=["first"])),
}


@pytest.mark.parametrize("kind", list(IRREGULAR_CASES))
def test_irregular_when_layers_disagree(kind):
    field, mutate = IRREGULAR_CASES[kind]
    results = []
    for lib in (peftkit, _ref()):
        torch.manual_seed(0)
        model = _two_adapters(lib, LLAMA, merge=False)
        if lib is peftkit:
            model.set_adapter("first", inference_mode=False)
        else:
            model.set_adapter("first")
        before = (_status(model) if lib is peftkit else _ref_status(model))[0]
        assert before[field] != "irregular" and "irregular" not in before["requires_grad"].values()
        mutate(_first_layer(model))
        after = _status(model) if lib is peftkit else _ref_status(model)
        results.append(after)
    model_status, layers = results[0]
    if field == "requires_grad":
        assert model_status["requires_grad"] == {"first": "irregular", "second": False}
        assert layers[0]["requires_grad"] == {"first": "irregular", "second": False}  # A frozen, B trainable in that layer
        assert layers[1]["requires_grad"] == {"first": True, "second": False}
    else:
        assert model_status[field] == "irregular"
    assert results[1] == results[0]  # the reference reports the same


# ---------------------------------------------------------------------------------------------- injected / types
def test_injected_model_matches_reference():
    peft = _ref()
    statuses = []
    for lib in (peftkit, peft):
        torch.manual_seed(0)
        model = lib.inject_adapter_in_model(lib.LoraConfig(target_modules=["lin0", "lin1"], r=4), MLP())
        statuses.append(_status(model) if lib is peftkit else _ref_status(model))
    (model_status, layers), reference = statuses
    assert (model_status["base_model_type"], model_status["adapter_model_type"], model_status["peft_types"]) == (
        "other", "None", {})
    assert [s["name"] for s in layers] == ["lin0", "lin1"]
    assert model_status["trainable_params"] == 4 * (10 + 20) + 4 * (20 + 2)
    assert statuses[0] == reference


def test_injected_transformers_model_reports_its_class():
    model = inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), LLAMA.build())
    status = get_model_status(model)
    assert (status.base_model_type, status.adapter_model_type, status.num_adapter_layers) == (
        "LlamaForCausalLM", "None", 2)


@pytest.mark.parametrize(("case_name", "targets", "to_save", "types"), [
    ("custom-emb", ["emb"], ["lin0"], ["lora.Embedding", "ModulesToSaveWrapper"]),
    ("custom-conv2d", ["conv"], None, ["lora.Conv2d"]),
    ("custom-conv1d", ["conv"], None, ["lora.Conv1d"]),
    ("gpt2-causal", ["c_attn"], None, ["lora.Linear", "lora.Linear"]),
])
def test_module_types_match_reference(case_name, targets, to_save, types):
    peft = _ref()
    case = CASES_BY_NAME[case_name]
    statuses = []
    for lib in (peftkit, peft):
        torch.manual_seed(0)
        config = lib.LoraConfig(target_modules=targets, modules_to_save=to_save)
        statuses.append(_status(lib.get_peft_model(case.build(), config)) if lib is peftkit else _ref_status(
            lib.get_peft_model(case.build(), config)))
    assert [s["module_type"] for s in statuses[0][1]] == types
    assert statuses[0] == statuses[1]


def test_model_without_adapters_raises():
    with pytest.raises(ConfigError, match="no adapter layers"):
        get_layer_status(MLP())
    with pytest.raises(ValueError, match="no adapter layers"):  # a ValueError, like the reference's
        get_model_status(MLP())


def test_peft_model_methods_equal_functions():
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    assert model.get_layer_status() == get_layer_status(model)
    assert model.get_model_status() == get_model_status(model)
    assert [s.module_type for s in model.get_layer_status()] == ["lora.Linear", "ModulesToSaveWrapper"]
