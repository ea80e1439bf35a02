"""LoraConfig / PeftConfig: reference fields and defaults, JSON round trip, forward compatibility, validation,
and the promise that peftkit never mutates a user's config."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
from models import tiny_bert, tiny_gpt2, tiny_llama

from peftkit import (
    ConfigError,
    LoraConfig,
    PeftConfig,
    PeftType,
    PeftWarning,
    TaskType,
    get_peft_config,
    get_peft_model,
)

# REFERENCE.md §1.1: every LoraConfig field with its default (PeftConfig fields first)
REFERENCE_DEFAULTS = {
    "task_type": None,
    "peft_type": PeftType.LORA,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "r": 8,
    "target_modules": None,
    "exclude_modules": None,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "monteclora_config": None,
    "arrow_config": None,
    "kasa_config": None,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "ensure_weight_tying": False,
}

# REFERENCE.md §2.2: a real adapter_config.json written by peft 0.21.2
REFERENCE_LORA_JSON = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16, "lora_bias": False, "lora_dropout": 0.05,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 8,
    "rank_pattern": {}, "revision": None, "target_modules": ["q_proj", "v_proj"], "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}


def _without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


# ---------------------------------------------------------------------------------------------- defaults


def test_lora_defaults_match_reference():
    config = LoraConfig()
    for name, default in REFERENCE_DEFAULTS.items():
        assert getattr(config, name) == default, name
    assert config.peft_version == "0.21.2@peftkit-0.1.0"


def test_lora_fields_cover_reference_json():
    # every key the reference writes is a field (so files load without dropping anything) and vice versa
    # except runtime_config, a field that neither library ever writes
    fields = {f.name for f in dataclasses.fields(LoraConfig)} - {"runtime_config"}
    assert set(REFERENCE_LORA_JSON) == fields
    assert set(LoraConfig().to_dict()) == fields


def test_list_targets_become_sets_and_strings_stay():
    config = LoraConfig(target_modules=["q_proj", "v_proj", "q_proj"], exclude_modules=["k_proj"])
    assert config.target_modules == {"q_proj", "v_proj"}
    assert isinstance(config.target_modules, set)
    assert config.exclude_modules == {"k_proj"}
    assert LoraConfig(target_modules=r".*\.q_proj").target_modules == r".*\.q_proj"
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"


def test_task_type_accepts_enum_and_string():
    assert LoraConfig(task_type="CAUSAL_LM").task_type is TaskType.CAUSAL_LM
    assert LoraConfig(task_type=TaskType.SEQ_CLS).task_type == "SEQ_CLS"


# ---------------------------------------------------------------------------------------------- JSON round trip


def _full_config() -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["v_proj", "q_proj", "k_proj"],
        exclude_modules=["k_proj"], bias="lora_only", use_rslora=True, modules_to_save=["lm_head"],
        init_lora_weights="gaussian", layers_to_transform=[0, 1], layers_pattern="layers",
        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 32}, base_model_name_or_path="some/model",
        revision="main",
    )


def test_round_trip_equals_original(tmp_path):
    config = _full_config()
    before = copy.deepcopy(config)
    config.save_pretrained(tmp_path)
    assert config == before  # save does not touch the object (inference_mode stays False in memory)
    assert config.inference_mode is False
    loaded = LoraConfig.from_pretrained(tmp_path)
    assert type(loaded) is LoraConfig
    assert loaded.inference_mode is False  # the config's own value is written, as the reference does
    assert loaded.to_dict() == config.to_dict()
    assert loaded.target_modules == {"q_proj", "v_proj", "k_proj"}


def test_file_format_sorted_keys_indent2_sorted_lists(tmp_path):
    config = _full_config()
    config.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert data["inference_mode"] is False  # the config's value (PeftModel.save_pretrained writes true)
    assert data["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    assert data["exclude_modules"] == ["k_proj"]
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["peft_version"] == "0.21.2@peftkit-0.1.0"
    assert "runtime_config" not in data


def test_to_json_string_is_deterministic():
    a = LoraConfig(target_modules=["b", "a", "c"]).to_json_string()
    b = LoraConfig(target_modules=["c", "b", "a"]).to_json_string()
    assert a == b


def test_unknown_keys_load_with_warning_naming_them(tmp_path):
    data = dict(REFERENCE_LORA_JSON, some_future_field=3, another_one="x")
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(PeftWarning, match="another_one.*some_future_field") as record:
        config = LoraConfig.from_pretrained(tmp_path)
    assert any("some_future_field" in str(w.message) for w in record)
    assert not hasattr(config, "some_future_field")
    assert config.r == 8


def test_runtime_config_dropped_with_warning(tmp_path):
    data = dict(REFERENCE_LORA_JSON, runtime_config={"ephemeral_gpu_offload": False})
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(PeftWarning, match="runtime_config"):
        config = PeftConfig.from_pretrained(tmp_path)
    assert "runtime_config" not in config.to_dict()


def test_peft_config_dispatches_on_peft_type(tmp_path):
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is LoraConfig
    assert config.r == 4 and config.target_modules == {"q_proj"}
    assert type(get_peft_config({"peft_type": "LORA", "r": 2})) is LoraConfig


def test_from_pretrained_overrides(tmp_path):
    LoraConfig(r=4).save_pretrained(tmp_path)
    assert LoraConfig.from_pretrained(tmp_path, r=2).r == 2


def test_reads_reference_written_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(REFERENCE_LORA_JSON, indent=2, sort_keys=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown keys in a reference file
        config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, LoraConfig)
    assert config.r == 8 and config.lora_alpha == 16 and config.lora_dropout == 0.05
    assert config.task_type is TaskType.CAUSAL_LM and config.peft_type is PeftType.LORA
    assert config.target_modules == {"q_proj", "v_proj"}
    assert config.peft_version == "0.21.2"  # the writer's version is kept
    assert config.inference_mode is True


def test_missing_config_raises_naming_path(tmp_path):
    from peftkit import AdapterLoadError

    with pytest.raises(AdapterLoadError, match=str(tmp_path)):
        PeftConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- validation

BAD_CONFIGS = [
    ({"r": 0}, "r", "0"),
    ({"r": -1}, "r", "-1"),
    ({"r": 1.5}, "r", "1.5"),
    ({"lora_dropout": 1.0}, "lora_dropout", "1.0"),
    ({"lora_dropout": -0.1}, "lora_dropout", "-0.1"),
    ({"bias": "foo"}, "bias", "foo"),
    ({"init_lora_weights": "bogus"}, "init_lora_weights", "bogus"),
    ({"layers_pattern": "layers"}, "layers_pattern", "layers"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform", "[0]"),
    ({"task_type": "NOT_A_TASK"}, "task_type", "NOT_A_TASK"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern", "0"),
    ({"lora_bias": True, "init_lora_weights": "gaussian"}, "lora_bias", "gaussian"),
]


@pytest.mark.parametrize(("kwargs", "field", "value"), BAD_CONFIGS, ids=[str(k) for k, _, _ in BAD_CONFIGS])
def test_invalid_values_raise_config_error(kwargs, field, value):
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert field in message and value in message, message
    assert info.value.field.startswith(field)


def test_valid_edge_values():
    assert LoraConfig(r=1, lora_dropout=0.0).r == 1
    assert LoraConfig(lora_dropout=0.999).lora_dropout == 0.999
    assert LoraConfig(init_lora_weights="pissa_niter_4").init_lora_weights == "pissa_niter_4"
    assert LoraConfig(layers_to_transform=0, layers_pattern="layers").layers_to_transform == 0
    assert LoraConfig(lora_bias=True, init_lora_weights=False).lora_bias is True


# ---------------------------------------------------------------------------------------------- no mutation


def _assert_not_mutated(model, config, **kwargs):
    before = copy.deepcopy(config)
    peft_model = get_peft_model(model, config, **kwargs)
    assert config == before
    assert config.to_dict() == before.to_dict()
    return peft_model


def test_no_mutation_llama_list_targets():
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2})
    peft_model = _assert_not_mutated(tiny_llama(), config)
    assert peft_model.peft_config["default"] is not config


def test_no_mutation_gpt2_conv1d():
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"])
    peft_model = _assert_not_mutated(tiny_gpt2(), config)
    assert config.fan_in_fan_out is False
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out is True


def test_no_mutation_seq_cls_modules_to_save():
    config = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"])
    peft_model = _assert_not_mutated(tiny_bert("SEQ_CLS"), config)
    assert config.modules_to_save is None
    assert "classifier" in peft_model.peft_config["default"].modules_to_save


def test_no_mutation_target_none_uses_default_table():
    config = LoraConfig(task_type="CAUSAL_LM")
    peft_model = _assert_not_mutated(tiny_llama(), config)
    assert config.target_modules is None
    assert peft_model.peft_config["default"].target_modules == {"q_proj", "v_proj"}


def test_no_mutation_all_linear():
    config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear")
    peft_model = _assert_not_mutated(tiny_llama(), config)
    assert config.target_modules == "all-linear"
    resolved = peft_model.peft_config["default"].target_modules
    assert isinstance(resolved, set) and "model.layers.0.self_attn.q_proj" in resolved
    assert "lm_head" not in resolved
