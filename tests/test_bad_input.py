"""Bad input gets a typed error naming the field and what is allowed, never an untyped crash (issue 16, items 7-8).

Properties:
- every method's config rejects a wrongly typed module-name or pattern field with :class:`ConfigError` naming it
  (also a ``TypeError``, which the reference's crash is);
- an ``adapter_config.json`` nested deeper than the bound is refused with :class:`AdapterLoadError` naming the
  file, without ``RecursionError``;
- ``get_peft_model`` refuses a model that is not an ``nn.Module``;
- NaN / inf in loaded adapter tensors is reported with a :class:`PeftWarning` naming them.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import pytest
import torch
from models import MLP

from peftkit import LoraConfig, PeftConfig, PeftWarning, get_peft_model
from peftkit.errors import AdapterLoadError, ConfigError
from peftkit.registry import all_methods
from peftkit.serialization.state_dict import get_peft_model_state_dict, set_peft_model_state_dict

#: fields that take module names or ``{regex: value}`` patterns, where a wrong type used to crash untyped
CHECKED_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save", "rank_pattern",
                  "alpha_pattern")
BAD_VALUES = (123, 0, 5.5, object())
METHODS = all_methods()


def _base_kwargs(spec: Any) -> dict[str, Any]:
    """A valid keyword set for ``spec.config_cls`` (its first conformance example, AdaLoRA with ``total_step``)."""
    kwargs = dict(spec.example_configs[0]) if spec.example_configs else {}
    if "total_step" in {f.name for f in dataclasses.fields(spec.config_cls)}:
        kwargs.setdefault("total_step", 100)
    return kwargs


def _cases() -> list[Any]:
    cases = []
    for spec in METHODS:
        names = {f.name for f in dataclasses.fields(spec.config_cls)}
        for name in CHECKED_FIELDS:
            if name in names:
                cases.append(pytest.param(spec, name, id=f"{spec.config_cls.__name__}-{name}"))
    return cases


@pytest.mark.parametrize(("spec", "name"), _cases())
@pytest.mark.parametrize("value", BAD_VALUES, ids=lambda v: type(v).__name__)
def test_wrongly_typed_field_raises_config_error_naming_it(spec: Any, name: str, value: object) -> None:
    kwargs = _base_kwargs(spec)
    kwargs[name] = value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeftWarning)
        with pytest.raises(ConfigError) as info:
            spec.config_cls(**kwargs)
    assert info.value.field.startswith(name)
    assert "allowed" in str(info.value)
    assert isinstance(info.value, TypeError)  # the builtin the reference's crash raises


@pytest.mark.parametrize("spec", METHODS, ids=lambda s: s.config_cls.__name__)
def test_valid_base_kwargs_still_build(spec: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeftWarning)
        spec.config_cls(**_base_kwargs(spec))


def test_wrongly_typed_field_in_saved_config_raises_config_error(tmp_path: Any) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": 123}))
    with pytest.raises(ConfigError, match="target_modules"):
        PeftConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("depth", [65, 100_000])
def test_deeply_nested_adapter_config_is_refused(tmp_path: Any, depth: int) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text('{"peft_type": "LORA", "x": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(AdapterLoadError, match="adapter_config.json") as info:
        PeftConfig.from_pretrained(str(tmp_path))
    assert "nest" in str(info.value)


def test_moderately_nested_adapter_config_loads(tmp_path: Any) -> None:
    # brackets inside strings do not count as nesting
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "target_modules": ["[" * 100 + "\\\"{"],
                                "megatron_config": {"a": [[[[1]]]]}}))
    config = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, LoraConfig)


@pytest.mark.parametrize("model", ["not a model", None, 3])
def test_get_peft_model_refuses_a_non_module(model: object) -> None:
    with pytest.raises(ConfigError, match="model") as info:
        get_peft_model(model, LoraConfig(target_modules=["lin0"]))  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_adapter_tensors_warn_on_load(bad: float) -> None:
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    names = sorted(state)
    state[names[0]][0, 0] = bad
    with pytest.warns(PeftWarning, match="NaN or inf") as record:
        set_peft_model_state_dict(model, state)
    message = " ".join(str(w.message) for w in record if issubclass(w.category, PeftWarning))
    assert names[0] in message and "1 " in message


def test_many_non_finite_tensors_are_listed_briefly() -> None:
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    state = {k: torch.full_like(v, float("nan")) for k, v in get_peft_model_state_dict(model).items()}
    with pytest.warns(PeftWarning, match="NaN or inf") as record:
        set_peft_model_state_dict(model, state)
    message = next(str(w.message) for w in record if "NaN or inf" in str(w.message))
    assert f"{len(state)} " in message and "more" in message
    assert sum(key in message for key in state) <= 3


def test_finite_adapter_loads_without_warning() -> None:
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False))
    state = get_peft_model_state_dict(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftWarning)
        set_peft_model_state_dict(model, state)


def test_non_finite_adapter_warns_through_from_pretrained(tmp_path: Any) -> None:
    from peftkit import PeftModel

    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    model.save_pretrained(str(tmp_path))
    with pytest.warns(PeftWarning, match=r"NaN or inf.*lora_B"):
        PeftModel.from_pretrained(MLP(), str(tmp_path))
