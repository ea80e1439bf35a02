"""Conformance: bad inputs raise typed errors whose messages say what was wrong, and a failed operation leaves the
model exactly as it was (modules, ``requires_grad`` flags, parameters, configs, outputs)."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from conformance_helpers import (
    FIRST,
    METHODS,
    REFUSED_PARAMS,
    MethodConfig,
    add_adapter,
    assert_unchanged,
    base_model,
    config_has_field,
    refused_field,
    snapshot,
    wrap,
)
from models import TaskCase
from safetensors.torch import load_file, save_file
from saved_files import drop_saved_config

from peftkit import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterMismatchError,
    AdapterNotFoundError,
    ConfigError,
    NoMatchingPeftModuleError,
    PeftModel,
    ShapeMismatchError,
    get_peft_model,
    get_peft_model_state_dict,
)

# ------------------------------------------------------------------------------------------------ configs

BAD_VALUES = [("r", 0, "r"), ("lora_dropout", 1.5, "lora_dropout"), ("bias", "some", "none")]
BAD_PARAMS = [
    pytest.param(spec, field, value, hint, id=f"{spec.peft_type}-{field}={value}")
    for spec in METHODS for field, value, hint in BAD_VALUES if config_has_field(spec, field)
]


@pytest.mark.parametrize("spec, field, value, hint", BAD_PARAMS)
def test_invalid_config_value_raises_config_error(spec, field: str, value: object, hint: str) -> None:
    """The error names the field and the value, and says what is allowed (``hint``)."""
    kwargs = {**(list(spec.example_configs) or [{}])[0], field: value}
    with pytest.raises(ConfigError) as info:
        spec.config_cls(target_modules=["q_proj"], **kwargs)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    message = str(info.value)
    assert field in message and repr(value) in message and hint in message and "allowed" in message


@pytest.mark.parametrize("mc, case", REFUSED_PARAMS)
def test_option_refused_for_the_target_kind_raises(mc: MethodConfig, case: TaskCase) -> None:
    """Options the reference refuses for a target kind (DoRA on grouped convolutions and MultiheadAttention, dropout
    and DoRA on parameters; ``kind_models.REFUSED``) raise a ConfigError (ValueError) naming the field; the model is
    unchanged."""
    model = base_model(case)
    before = snapshot(model, case)
    with pytest.raises(ConfigError) as info:
        get_peft_model(model, mc.config(case))
    assert isinstance(info.value, ValueError) and info.value.field == refused_field(mc, case)
    assert_unchanged(model, case, before)


def _typo(name: str) -> str:
    return name + name[-1]  # "q_proj" -> "q_projj"


@pytest.mark.parametrize("mc, case", [p for p in FIRST if p.values[1].target_modules])  # not the parameter case
def test_unmatched_target_names_closest_module(mc: MethodConfig, case: TaskCase) -> None:
    real = case.target_modules[0]
    typo = _typo(real)
    config = mc.config(case, target_modules=[typo])
    config_before = config.to_dict()
    model = base_model(case)
    before = snapshot(model, case)
    with pytest.raises(NoMatchingPeftModuleError) as info:
        get_peft_model(model, config)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert typo in message and "closest" in message
    # the real name must be suggested (the typo contains it, so look for it with the typo removed)
    assert re.search(rf"(?<!\w){re.escape(real)}(?!\w)", message.replace(typo, "")), message
    assert_unchanged(model, case, before)
    assert config.to_dict() == config_before, "the user's config was modified"


# ------------------------------------------------------------------------------------------------ adapter names


@pytest.mark.parametrize("mc, case", FIRST)
def test_set_unknown_adapter_raises(mc: MethodConfig, case: TaskCase) -> None:
    model = wrap(case, mc.observable(case))
    before = snapshot(model, case)
    for bad in ("nope", ["default", "nope"]):
        with pytest.raises(AdapterNotFoundError, match="nope") as info:
            model.set_adapter(bad)
        assert isinstance(info.value, ValueError) and "default" in str(info.value)
        assert_unchanged(model, case, before)


@pytest.mark.parametrize("mc, case", FIRST)
def test_add_existing_adapter_name_raises(mc: MethodConfig, case: TaskCase, tmp_path: Path) -> None:
    model = wrap(case, mc.observable(case))
    model.save_pretrained(tmp_path)
    before = snapshot(model, case)
    with pytest.raises(AdapterExistsError, match="default") as info:
        add_adapter(model, "default", mc.observable(case), seed=1)
    assert isinstance(info.value, ValueError)
    assert_unchanged(model, case, before)
    with pytest.raises(AdapterExistsError, match="default"):
        model.load_adapter(tmp_path, adapter_name="default")
    assert_unchanged(model, case, before)


@pytest.mark.parametrize("mc, case", [p for p in FIRST if config_has_field(p.values[0].spec, "bias")])
def test_second_adapter_with_bias_raises(mc: MethodConfig, case: TaskCase) -> None:
    """At most one adapter may train biases: the second one is refused and nothing changes."""
    model = wrap(case, mc.observable(case, bias="all"))
    before = snapshot(model, case)
    with pytest.raises(ConfigError, match="bias") as info:
        add_adapter(model, "other", mc.observable(case, bias=f"{mc.spec.prefix}only"), seed=1)
    assert isinstance(info.value, ValueError) and "default" in str(info.value)
    assert_unchanged(model, case, before)
    add_adapter(model, "other", mc.observable(case, bias="none"), seed=1)  # bias="none" is fine
    assert list(model.peft_config) == ["default", "other"]


# ------------------------------------------------------------------------------------------------ loading


def _saved(mc: MethodConfig, case: TaskCase, directory: Path) -> Path:
    wrap(case, mc.observable(case)).save_pretrained(directory)
    return directory


def _assert_load_fails(
    mc: MethodConfig, case: TaskCase, path: Path, error: type[Exception], *needles: str
) -> None:
    """Both ``PeftModel.from_pretrained`` (on a fresh base) and ``load_adapter`` (on a wrapped model) raise
    ``error`` with ``needles`` in the message, and leave their model unchanged."""
    base = base_model(case)
    before = snapshot(base, case)
    with pytest.raises(error) as info:
        PeftModel.from_pretrained(base, path)
    assert all(n in str(info.value) for n in needles), str(info.value)
    assert_unchanged(base, case, before)
    assert not hasattr(base, "peft_config")

    model = wrap(case, mc.observable(case), seed=1)
    before = snapshot(model, case)
    with pytest.raises(error) as info:
        model.load_adapter(path, adapter_name="loaded")
    assert all(n in str(info.value) for n in needles), str(info.value)
    assert_unchanged(model, case, before)


@pytest.mark.parametrize("mc, case", FIRST)
def test_load_from_missing_directory_raises(mc: MethodConfig, case: TaskCase, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-adapter"
    _assert_load_fails(mc, case, missing, AdapterLoadError, str(missing))


@pytest.mark.parametrize("mc, case", FIRST)
def test_load_from_directory_without_weights_raises(mc: MethodConfig, case: TaskCase, tmp_path: Path) -> None:
    path = _saved(mc, case, tmp_path)
    os.remove(path / "adapter_model.safetensors")
    _assert_load_fails(mc, case, path, AdapterLoadError, "adapter_model.safetensors", "adapter_model.bin")


@pytest.mark.parametrize("mc, case", FIRST)
def test_load_truncated_safetensors_raises(mc: MethodConfig, case: TaskCase, tmp_path: Path) -> None:
    path = _saved(mc, case, tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _assert_load_fails(mc, case, path, AdapterLoadError, "adapter_model.safetensors")


@pytest.mark.parametrize("mc, case", FIRST)
def test_load_tensor_with_wrong_shape_raises(mc: MethodConfig, case: TaskCase, tmp_path: Path) -> None:
    """One adapter tensor of the checkpoint has an extra row: ShapeMismatchError naming that key."""
    path = _saved(mc, case, tmp_path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if any(part.startswith(mc.spec.prefix) for part in k.split(".")))
    tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    save_file(tensors, weights, metadata={"format": "pt"})
    _assert_load_fails(mc, case, path, ShapeMismatchError, key)


@pytest.mark.parametrize("mc, case", [p for p in FIRST
                                     if config_has_field(p.values[0].spec, p.values[0].spec.rank_field)])
def test_load_checkpoint_with_other_r_raises(mc: MethodConfig, case: TaskCase, tmp_path: Path) -> None:
    """A checkpoint saved with rank r loaded into rank 2r: ShapeMismatchError; base / wrapped model unchanged. Where
    2r gives the same tensor shapes (OFT fitting r to a layer's divisors, Uni-LoRA's one shared vector), only the
    check of the config saved with the weights applies."""
    path = _saved(mc, case, tmp_path)
    field = mc.spec.rank_field  # "r", or AdaLoRA's "init_r"
    r = mc.field(field)
    with warnings.catch_warnings():  # OFT fits r to a divisor of each layer's size (warns): 2r may give r's shapes
        warnings.simplefilter("ignore")
        doubled = get_peft_model_state_dict(wrap(case, mc.observable(case, **{field: 2 * r})))
    shapes_differ = ({k: v.shape for k, v in doubled.items()}
                     != {k: v.shape for k, v in load_file(path / "adapter_model.safetensors").items()})
    if shapes_differ:
        base = base_model(case)
        before = snapshot(base, case)
        with pytest.raises(ShapeMismatchError, match="mismatch") as info:
            PeftModel.from_pretrained(base, path, config=mc.observable(case, **{field: 2 * r}))
        assert isinstance(info.value, AdapterLoadError) and isinstance(info.value, ValueError)
        assert_unchanged(base, case, before)

    config_file = path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    assert saved[field] == r
    config_file.write_text(json.dumps({**saved, field: 2 * r}))
    model = wrap(case, mc.observable(case), seed=1)
    before = snapshot(model, case)
    with pytest.raises(AdapterMismatchError, match=f"{field}: {2 * r} in adapter_config.json but {r} with"):
        model.load_adapter(path, adapter_name="loaded")  # the config saved with the weights says otherwise
    assert_unchanged(model, case, before)
    if shapes_differ:
        drop_saved_config(path)  # weights of another writer: the shape check catches it
        with pytest.raises(ShapeMismatchError, match="mismatch"):
            model.load_adapter(path, adapter_name="loaded")
        assert_unchanged(model, case, before)
