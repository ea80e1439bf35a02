"""Which modules a LoraConfig targets: list / regex / all-linear / default tables, exclusions, layer filters,
modules_to_save, rank/alpha patterns, GPT-2 Conv1D detection, and the pure, printable plan."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from models import MLP, tiny_bart, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt, tiny_t5, tiny_whisper
from torch import nn

from peftkit import (
    AdapterLayer,
    LoraConfig,
    ModulesToSaveWrapper,
    NoMatchingPeftModuleError,
    PeftWarning,
    UnsupportedModuleError,
    get_peft_model,
    inject_adapter_in_model,
)
from peftkit.injection.match import matches


def lora_names(model: nn.Module) -> set[str]:
    """Names of the LoRA layers in ``model`` (a PeftModel or a plain model), without the wrapper prefix."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name for name, m in base.named_modules() if isinstance(m, AdapterLayer)}


def leaves(names: set[str]) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n in names}


class Named(nn.Module):
    """Modules whose names share suffixes: proj, q_proj, block.proj, block.q_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.q_proj = nn.Linear(4, 4)
        self.block = nn.Module()
        self.block.proj = nn.Linear(4, 4)
        self.block.q_proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.block.q_proj(self.block.proj(self.q_proj(self.proj(x))))


# ---------------------------------------------------------------------------------------------- list / regex


def test_matches_function_rules():
    assert matches(["proj"], "proj") and matches(["proj"], "block.proj")
    assert not matches(["proj"], "q_proj") and not matches(["proj"], "block.q_proj")
    assert matches(["block.proj"], "block.proj") and not matches(["block.proj"], "proj")
    assert matches(r".*q_proj", "block.q_proj") and not matches(r"q_proj", "block.q_proj")
    assert not matches(None, "proj")


def test_list_target_exact_and_suffix_only():
    model = inject_adapter_in_model(LoraConfig(target_modules=["proj"]), Named())
    assert lora_names(model) == {"proj", "block.proj"}


def test_list_target_dotted_suffix():
    model = inject_adapter_in_model(LoraConfig(target_modules=["block.q_proj"]), Named())
    assert lora_names(model) == {"block.q_proj"}


def test_str_target_is_fullmatch():
    model = inject_adapter_in_model(LoraConfig(target_modules=r"block\..*proj"), Named())
    assert lora_names(model) == {"block.proj", "block.q_proj"}
    with pytest.raises(NoMatchingPeftModuleError):  # "proj" as a regex must match the whole name
        inject_adapter_in_model(LoraConfig(target_modules="roj"), Named())
    model = inject_adapter_in_model(LoraConfig(target_modules="q_proj"), Named())
    assert lora_names(model) == {"q_proj"}


def test_regex_on_llama():
    config = LoraConfig(target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj")
    peft_model = get_peft_model(tiny_llama(), config)
    assert lora_names(peft_model) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}


# ---------------------------------------------------------------------------------------------- all-linear


def test_all_linear_llama_excludes_lm_head():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    names = lora_names(peft_model)
    assert leaves(names) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(names) == 14
    assert "lm_head" not in names
    assert peft_model.peft_config["default"].target_modules == names  # saved as full names


def test_all_linear_gpt2_includes_conv1d_excludes_lm_head():
    peft_model = get_peft_model(tiny_gpt2(), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    names = lora_names(peft_model)
    assert leaves(names) == {"c_attn", "c_proj", "c_fc"}
    assert len(names) == 8  # 2 layers x (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
    assert "lm_head" not in names


@pytest.mark.parametrize(("build", "head"), [(lambda: tiny_bert("SEQ_CLS"), "classifier"),
                                             (lambda: tiny_llama("SEQ_CLS"), "score")])
def test_all_linear_seq_cls_excludes_classifier(build, head):
    # without a PeftModel the head is not in modules_to_save: all-linear itself must leave it out
    model = inject_adapter_in_model(LoraConfig(task_type="SEQ_CLS", target_modules="all-linear"), build())
    names = lora_names(model)
    assert head not in names and len(names) > 0
    # through get_peft_model the head becomes a full trainable copy, never a LoRA layer
    peft_model = get_peft_model(build(), LoraConfig(task_type="SEQ_CLS", target_modules="all-linear"))
    assert head not in lora_names(peft_model)
    assert isinstance(getattr(peft_model.get_base_model(), head), ModulesToSaveWrapper)


# ---------------------------------------------------------------------------------------------- default tables

DEFAULTS = [
    ("llama", tiny_llama, {"q_proj", "v_proj"}),
    ("gpt2", tiny_gpt2, {"c_attn"}),
    ("opt", tiny_opt, {"q_proj", "v_proj"}),
    ("t5", tiny_t5, {"q", "v"}),
    ("bart", tiny_bart, {"q_proj", "v_proj"}),
    ("bert", lambda: tiny_bert(None), {"query", "value"}),
    ("whisper", tiny_whisper, {"q_proj", "v_proj"}),  # the reference has no default for whisper
]


@pytest.mark.parametrize(("model_type", "build", "expected"), DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_default_targets(model_type, build, expected):
    model = build()
    assert model.config.model_type == model_type
    all_expected = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in expected}
    peft_model = get_peft_model(model, LoraConfig())
    names = lora_names(peft_model)
    assert names == all_expected
    assert peft_model.peft_config["default"].target_modules == expected


def test_custom_model_without_targets_raises():
    with pytest.raises(NoMatchingPeftModuleError, match="target_modules") as info:
        get_peft_model(MLP(), LoraConfig())
    assert "pass target_modules" in str(info.value)
    assert "lin0" in str(info.value)  # suggests the linear layers it has


# ---------------------------------------------------------------------------------------------- exclusions


def test_exclude_modules_list():
    config = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"])
    names = lora_names(get_peft_model(tiny_llama(), config))
    assert names == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.self_attn.v_proj"}


def test_exclude_modules_regex():
    config = LoraConfig(target_modules="all-linear", exclude_modules=r".*mlp\..*")
    names = lora_names(get_peft_model(tiny_llama(), config))
    assert leaves(names) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_all_excluded_raises():
    config = LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"])
    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(NoMatchingPeftModuleError, match="All modules were excluded"):
        get_peft_model(model, config)
    assert {n: type(m) for n, m in model.named_modules()} == before


# ---------------------------------------------------------------------------------------------- layer filters


@pytest.mark.parametrize("pattern", [None, "layers"])
@pytest.mark.parametrize(("ltt", "wanted"), [(1, {1}), ([0], {0}), ([0, 1], {0, 1})])
def test_layers_to_transform(ltt, wanted, pattern):
    config = LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=ltt, layers_pattern=pattern)
    names = lora_names(get_peft_model(tiny_llama(), config))
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in wanted for p in ("q_proj", "v_proj")}


def test_layers_pattern_that_matches_nothing_raises():
    config = LoraConfig(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks")
    with pytest.raises(NoMatchingPeftModuleError, match="layers_to_transform"):
        get_peft_model(tiny_llama(), config)


def test_gpt2_layers_pattern_h():
    config = LoraConfig(target_modules=["c_attn"], layers_to_transform=[1], layers_pattern="h")
    assert lora_names(get_peft_model(tiny_gpt2(), config)) == {"transformer.h.1.attn.c_attn"}


# ---------------------------------------------------------------------------------------------- modules_to_save


def test_modules_to_save_never_targeted():
    config = LoraConfig(target_modules=["lin0", "lin1"], modules_to_save=["lin1"])
    peft_model = get_peft_model(MLP(), config)
    assert lora_names(peft_model) == {"lin0"}
    base = peft_model.get_base_model()
    assert isinstance(base.lin1, ModulesToSaveWrapper)
    assert not any(isinstance(m, AdapterLayer) for m in base.lin1.modules())


def test_modules_to_save_llama_lm_head_not_lora_with_all_modules_list():
    config = LoraConfig(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    peft_model = get_peft_model(tiny_llama(), config)
    assert "lm_head" not in lora_names(peft_model)
    assert isinstance(peft_model.get_base_model().lm_head, ModulesToSaveWrapper)


# ---------------------------------------------------------------------------------------------- errors


def test_typo_lists_closest_names():
    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(NoMatchingPeftModuleError) as info:
        get_peft_model(model, LoraConfig(target_modules=["q_projj"]))
    message = str(info.value)
    assert "q_projj" in message and "closest names" in message
    assert "q_proj" in message.split("closest names")[1]
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_unsupported_module_type():
    model = Named()
    with pytest.raises(UnsupportedModuleError, match="norm") as info:
        inject_adapter_in_model(LoraConfig(target_modules=["norm", "proj"]), model)
    assert isinstance(info.value, TypeError)
    assert "LayerNorm" in str(info.value)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


# ---------------------------------------------------------------------------------------------- patterns


def _layer(peft_model, name):
    return peft_model.get_base_model().get_submodule(name)


def test_rank_and_alpha_pattern():
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16,
                        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "v_proj": 4},
                        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})
    pm = get_peft_model(tiny_llama(), config)
    q0, q1 = _layer(pm, "model.layers.0.self_attn.q_proj"), _layer(pm, "model.layers.1.self_attn.q_proj")
    v0 = _layer(pm, "model.layers.0.self_attn.v_proj")
    assert (q0.r["default"], q0.scaling["default"]) == (2, 16 / 2)
    assert (q1.r["default"], q1.scaling["default"]) == (8, 3 / 8)
    assert (v0.r["default"], v0.scaling["default"]) == (4, 16 / 4)
    assert q0.lora_A["default"].weight.shape == (2, 32)
    assert v0.lora_B["default"].weight.shape == (16, 4)  # GQA: v_proj maps 32 -> 16


def test_rslora_scaling_with_patterns():
    config = LoraConfig(target_modules=["q_proj"], r=8, lora_alpha=16, use_rslora=True,
                        rank_pattern={"layers.1.self_attn.q_proj": 4})
    pm = get_peft_model(tiny_llama(), config)
    assert _layer(pm, "model.layers.0.self_attn.q_proj").scaling["default"] == pytest.approx(16 / math.sqrt(8))
    assert _layer(pm, "model.layers.1.self_attn.q_proj").scaling["default"] == pytest.approx(16 / 2)


def test_unused_rank_pattern_warns():
    config = LoraConfig(target_modules=["q_proj"], rank_pattern={"not_a_module": 2}, alpha_pattern={"nope": 3})
    with pytest.warns(PeftWarning) as record:
        get_peft_model(tiny_llama(), config)
    messages = " ".join(str(w.message) for w in record)
    assert "not_a_module" in messages and "nope" in messages


def test_used_rank_pattern_does_not_warn():
    config = LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftWarning)
        get_peft_model(tiny_llama(), config)


# ---------------------------------------------------------------------------------------------- GPT-2 Conv1D


def test_gpt2_fan_in_fan_out_detected():
    config = LoraConfig(target_modules=["c_attn"], r=4)
    pm = get_peft_model(tiny_gpt2(), config)
    layer = _layer(pm, "transformer.h.0.attn.c_attn")
    assert layer.fan_in_fan_out is True
    assert layer.get_base_layer().weight.shape == (32, 96)  # Conv1D stores (in, out)
    assert layer.lora_A["default"].weight.shape == (4, 32)
    assert layer.lora_B["default"].weight.shape == (96, 4)
    assert layer.get_delta_weight("default").shape == (32, 96)
    assert config.fan_in_fan_out is False  # the user's config is never rewritten
    assert pm.peft_config["default"].fan_in_fan_out is True  # peftkit's copy records it, as the reference's file does


def test_linear_has_no_fan_in_fan_out():
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4))
    assert _layer(pm, "model.layers.0.self_attn.q_proj").fan_in_fan_out is False


# ---------------------------------------------------------------------------------------------- plan


def _snapshot(model: nn.Module):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def test_plan_is_pure_and_printable():
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4))
    types, state, grads = _snapshot(pm)
    config = LoraConfig(target_modules=["v_proj", "q_proj"], r=2, rank_pattern={"v_proj": 3},
                        modules_to_save=["lm_head"])
    plan = pm.base_model.plan(config, "x")
    assert {layer.name for layer in plan.layers} == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    ranks = {layer.name: layer.options["r"] for layer in plan.layers}
    assert ranks["model.layers.0.self_attn.v_proj"] == 3 and ranks["model.layers.0.self_attn.q_proj"] == 2
    assert plan.modules_to_save == ("lm_head",)
    text = str(plan)
    assert "'x'" in text and "model.layers.1.self_attn.v_proj" in text and "lm_head" in text
    types2, state2, grads2 = _snapshot(pm)
    assert types2 == types and grads2 == grads
    assert state2.keys() == state.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    assert list(pm.peft_config) == ["default"]
