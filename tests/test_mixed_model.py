"""``PeftMixedModel`` / ``get_peft_model(..., mixed=True)``: adapters of different types (LoRA, LoHa, LoKr, AdaLoRA)
on one model, active together, as the reference's mixed model: layers of different methods on one module nest (each
new method's layer wraps the previous one), every active adapter adds its update, and each adapter saves as a normal
adapter directory that either library loads (also into a mixed model)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import LoHaConfig, LoKrConfig, LoraConfig, PeftMixedModel
from peftkit.errors import AdapterNotFoundError, ConfigError, UnsupportedOperationError
from peftkit.layers.base import AdapterLayer
from tests.models import causal_lm_inputs, tiny_llama
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

peft = pytest.importorskip("peft")

#: both libraries compute base(x) + each adapter's update with their own code paths (float32, the tiny model's
#: reductions: see tests/numerics.py)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
NAMES = ("default", "style", "detail")


def _configs(lib) -> dict[str, object]:
    """One config per adapter name; q_proj gets all three methods, so their layers nest there."""
    return {
        "default": lib.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "style": lib.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "k_proj"], init_weights=False),
        "detail": lib.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"], init_weights=False),
    }


def _base() -> nn.Module:
    return tiny_llama().eval()


def _inputs() -> dict[str, torch.Tensor]:
    return {k: v for k, v in causal_lm_inputs(2).items() if k != "labels"}


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs()).logits


def _build(lib, seed: int = 0, names: tuple[str, ...] = NAMES) -> nn.Module:
    """A mixed model of ``lib`` with the adapters ``names`` added in that order (random, non-identity weights)."""
    configs = _configs(lib)
    torch.manual_seed(seed)
    model = lib.get_peft_model(_base(), configs[names[0]], adapter_name=names[0], mixed=True)
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    model.set_adapter(list(names))
    return model.eval()


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    prefixes = ("lora_", "hada_", "lokr_")
    return {k: v for k, v in model.state_dict().items() if any(p in k for p in prefixes)}


def _mirror(names: tuple[str, ...] = NAMES) -> tuple[nn.Module, nn.Module]:
    """``(peftkit model, reference model)`` with the adapters added in the order ``names``, holding the same weights
    (copied from the reference)."""
    ref = _build(peft, names=names)
    ours = _build(peftkit, seed=1, names=names)
    ours_state, ref_state = _adapter_state(ours), _adapter_state(ref)
    assert ours_state.keys() == ref_state.keys()  # the same nesting, so the same in-memory keys
    missing, unexpected = ours.load_state_dict(ref_state, strict=False)
    assert not unexpected and not [k for k in missing if k in ref_state]
    return ours, ref


# ------------------------------------------------------------------------------------------------ structure


def test_get_peft_model_mixed_returns_peft_mixed_model() -> None:
    model = _build(peftkit)
    assert isinstance(model, PeftMixedModel) and not isinstance(model, peftkit.PeftModel)
    assert type(model.base_model).__name__ == "MixedModel"
    assert model.active_adapters == list(NAMES)
    assert {str(c.peft_type) for c in model.peft_config.values()} == {"LORA", "LOHA", "LOKR"}
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    chain = [type(q_proj).__module__.split(".")[-2]]  # the method package of each layer of the chain, outer first
    inner = q_proj.base_layer
    while isinstance(inner, AdapterLayer):
        chain.append(type(inner).__module__.split(".")[-2])
        inner = inner.base_layer
    assert chain == ["lokr", "loha", "lora"] and type(inner) is nn.Linear  # each method wraps the previous ones


def test_mixed_mapping_lists_the_compatible_methods() -> None:
    from peft.tuners.mixed import COMPATIBLE_TUNER_TYPES

    mixed = {str(k) for k in peftkit.PEFT_TYPE_TO_MIXED_MODEL_MAPPING}
    assert mixed == {"LORA", "LOHA", "LOKR", "ADALORA", "OFT", "SHIRA"}
    assert mixed == {str(t.value) for t in COMPATIBLE_TUNER_TYPES}  # IA3 is not: the reference refuses it too
    assert peftkit.PEFT_TYPE_TO_MIXED_MODEL_MAPPING["LOHA"] is peftkit.LoHaModel


# ------------------------------------------------------------------------------------------------ outputs


#: orders of adding the adapters: the nesting on q_proj follows it (the last type added is outermost)
ORDERS = [NAMES, ("style", "default", "detail"), ("detail", "style", "default")]


@pytest.mark.parametrize("names", ORDERS, ids="-".join)
def test_all_active_outputs_equal_reference(names: tuple[str, ...]) -> None:
    ours, ref = _mirror(names)
    assert not torch.allclose(_logits(ours), _logits(_base()), **TOL)  # the adapters change the output
    torch.testing.assert_close(_logits(ours), _logits(ref), **TOL)


@pytest.mark.parametrize("subset", [["default"], ["style", "detail"], ["detail", "default"]], ids=str)
def test_set_adapter_subset_equals_reference(subset: list[str]) -> None:
    ours, ref = _mirror()
    ours.set_adapter(subset)
    ref.set_adapter(subset)
    assert ours.active_adapters == subset
    torch.testing.assert_close(_logits(ours), _logits(ref), **TOL)


def test_every_active_adapter_applies() -> None:
    """Each adapter changes the output, and all three together differ from any two."""
    model = _build(peftkit)
    outputs = {}
    for subset in (["default", "style", "detail"], ["default", "style"], ["style", "detail"], ["default", "detail"]):
        model.set_adapter(subset)
        outputs[tuple(subset)] = _logits(model)
    full = outputs[("default", "style", "detail")]
    for subset, out in outputs.items():
        if len(subset) == 2:
            assert not torch.allclose(out, full, **TOL), subset


def test_disable_adapter_gives_base_output() -> None:
    expected = _logits(_base())
    model = _build(peftkit)
    with_adapters = _logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)  # the same base kernels on the same data
    torch.testing.assert_close(_logits(model), with_adapters, atol=0, rtol=0)  # the same forward, repeated


def test_merge_and_unload_equals_unmerged_output() -> None:
    model = _build(peftkit)
    expected = _logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    # merging adds each ΔW into W: the matmul order differs from base(x) + update(x)
    torch.testing.assert_close(_logits(merged), expected, **TOL)


def test_merge_and_unload_of_some_adapters() -> None:
    model = _build(peftkit)
    model.set_adapter(["default", "detail"])
    expected = _logits(model)
    merged = model.merge_and_unload(adapter_names=["default", "detail"])
    torch.testing.assert_close(_logits(merged), expected, **TOL)


def test_unload_gives_back_the_base_model() -> None:
    expected = _logits(_base())
    model = _build(peftkit)
    base = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    torch.testing.assert_close(_logits(base), expected, atol=0, rtol=0)  # the same modules and weights


# ------------------------------------------------------------------------------------------------ files


def test_save_writes_one_normal_directory_per_adapter(tmp_path) -> None:
    model = _build(peftkit)
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "adapter_config.json")  # "default" at the root, as PeftModel saves it
    for name, prefix in (("default", "lora_"), ("style", "hada_"), ("detail", "lokr_")):
        folder = tmp_path if name == "default" else tmp_path / name
        keys = load_file(folder / "adapter_model.safetensors")
        assert keys and all(f".{prefix}" in k for k in keys)
        # the keys an adapter alone on the model would have: no base_layer segment from the nesting
        assert all(".base_layer." not in k for k in keys), sorted(keys)[:3]
        assert "base_model.model.model.layers.0.self_attn.q_proj." + prefix in " ".join(keys)


def test_peftkit_files_load_in_reference_mixed_model(tmp_path) -> None:
    model = _build(peftkit)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    ref = peft.PeftMixedModel.from_pretrained(_base(), str(tmp_path), "default")
    ref.load_adapter(str(tmp_path / "style"), "style")
    ref.load_adapter(str(tmp_path / "detail"), "detail")
    ref.set_adapter(list(NAMES))
    torch.testing.assert_close(_logits(ref.eval()), expected, **TOL)


def test_peftkit_files_load_in_reference_peft_model(tmp_path) -> None:
    """Each directory is an ordinary adapter: the reference's PeftModel loads it alone."""
    model = _build(peftkit)
    model.set_adapter(["style"])
    expected = _logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["style"])
    ref = peft.PeftModel.from_pretrained(_base(), str(tmp_path / "style"), adapter_name="style")
    torch.testing.assert_close(_logits(ref.eval()), expected, **TOL)


def test_reference_files_load_in_peftkit_mixed_model(tmp_path) -> None:
    """Adapters the reference saved (one PeftModel each, as it cannot save a mixed model) load into both libraries'
    mixed models, in the same order, with the same outputs."""
    configs = _configs(peft)
    for seed, name in enumerate(NAMES):
        torch.manual_seed(seed)
        peft.get_peft_model(_base(), configs[name], adapter_name=name).save_pretrained(str(tmp_path / "out"))
    paths = {name: str(tmp_path / "out" / name) if name != "default" else str(tmp_path / "out") for name in NAMES}
    ref = peft.PeftMixedModel.from_pretrained(_base(), paths["default"], "default")
    ours = PeftMixedModel.from_pretrained(_base(), paths["default"], "default")
    for name in NAMES[1:]:
        ref.load_adapter(paths[name], name)
        ours.load_adapter(paths[name], name)
    ref.set_adapter(list(NAMES))
    ours.set_adapter(list(NAMES))
    assert all(not p.requires_grad for p in ours.parameters())  # loaded for inference (is_trainable=False)
    torch.testing.assert_close(_logits(ours), _logits(ref.eval()), **TOL)


def test_round_trip_in_peftkit(tmp_path) -> None:
    model = _build(peftkit)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftMixedModel.from_pretrained(_base(), tmp_path, "default")
    loaded.load_adapter(tmp_path / "style", "style")
    loaded.load_adapter(tmp_path / "detail", "detail")
    loaded.set_adapter(list(NAMES))
    torch.testing.assert_close(_logits(loaded), expected, atol=0, rtol=0)  # same weights, same kernels


# ------------------------------------------------------------------------------------------------ training


def test_training_updates_only_the_active_adapters() -> None:
    model = _build(peftkit)
    model.set_adapter(["default", "detail"])
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n or ".detail" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = causal_lm_inputs(2)
    model(**batch).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert any(".default" in n for n in changed) and any(".detail" in n for n in changed)


@pytest.mark.parametrize("names", ORDERS, ids="-".join)
def test_gradients_equal_reference(names: tuple[str, ...]) -> None:
    ours, ref = _mirror(names)
    batch = causal_lm_inputs(2)
    for model in (ours, ref):
        model.train()
        model(**batch).loss.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert ours_grads.keys() == ref_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TOL, msg=name)


# ------------------------------------------------------------------------------------------------ adapters


def test_delete_adapter_accepts_a_list() -> None:
    model = _build(peftkit)
    model.delete_adapter(["style", "detail"])
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert not any("hada_" in n or "lokr_" in n for n, p in model.named_parameters() if p.numel())
    with pytest.raises(AdapterNotFoundError):
        model.delete_adapter("style")


def test_lora_and_adalora_mix() -> None:
    """AdaLoRA's layer is not a LoRA layer: the two nest, as in the reference."""
    ref = peft.get_peft_model(_base(), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False), mixed=True)
    ref.add_adapter("ada", peft.AdaLoraConfig(target_modules=["q_proj"], total_step=10, init_lora_weights=False))
    ref.set_adapter(["default", "ada"])
    ours = peftkit.get_peft_model(_base(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False), mixed=True)
    ours.add_adapter("ada", peftkit.AdaLoraConfig(target_modules=["q_proj"], total_step=10, init_lora_weights=False))
    ours.set_adapter(["default", "ada"])
    ref_state = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    assert _adapter_state(ours).keys() == ref_state.keys()
    ours.load_state_dict(ref_state, strict=False)
    torch.testing.assert_close(_logits(ours.eval()), _logits(ref.eval()), **TOL)


def test_print_and_count_trainable_parameters(capsys) -> None:
    model = _build(peftkit)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith(f"trainable params: {trainable:,d} || all params: {total:,d}")


def test_status_is_refused_as_in_reference() -> None:
    model = _build(peftkit)
    with pytest.raises(TypeError, match="get_layer_status"):
        model.get_layer_status()
    with pytest.raises(UnsupportedOperationError):
        model.get_model_status()


# ------------------------------------------------------------------------------------------------ refusals


def test_prompt_learning_config_is_refused() -> None:
    config = peftkit.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    with pytest.raises(ConfigError, match="PROMPT_TUNING") as info:
        peftkit.get_peft_model(_base(), config, mixed=True)
    assert isinstance(info.value, ValueError)  # the reference raises ValueError
    assert info.value.field == "peft_type" and "LORA" in str(info.value)


def test_incompatible_adapter_type_is_refused_and_model_unchanged() -> None:
    model = _build(peftkit)
    expected = _logits(model)
    with pytest.raises(ConfigError, match="IA3"):
        model.add_adapter("ia3", peftkit.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    assert list(model.peft_config) == list(NAMES)
    torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)  # nothing changed: the same forward


def test_from_pretrained_refuses_incompatible_files(tmp_path) -> None:
    peftkit.get_peft_model(_base(), peftkit.IA3Config(target_modules=["q_proj"], feedforward_modules=[])
                           ).save_pretrained(tmp_path)
    base = _base()
    with pytest.raises(ConfigError, match="IA3"):
        PeftMixedModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())


def test_plain_peft_model_still_refuses_other_methods() -> None:
    model = peftkit.get_peft_model(_base(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="different peft types"):
        model.add_adapter("style", LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError):
        model.add_adapter("detail", LoKrConfig(target_modules=["q_proj"]))


def test_delete_of_a_merged_adapter_changes_nothing() -> None:
    model = _build(peftkit)
    model.base_model.merge_adapter(["detail"])
    with pytest.raises(peftkit.MergeError, match="detail"):
        model.delete_adapter(["style", "detail"])
    assert list(model.peft_config) == list(NAMES)


def test_plain_model_refuses_a_layer_of_another_method_with_a_hint() -> None:
    """Outside a mixed model a module holding another method's layer is refused (typed, naming the module)."""
    base = peftkit.get_peft_model(_base(), LoraConfig(target_modules=["q_proj"])).base_model.model
    with pytest.warns(peftkit.PeftWarning, match="already holds adapter layers"), \
            pytest.raises(peftkit.UnsupportedModuleError, match=r"q_proj.*PeftMixedModel"):
        peftkit.get_peft_model(base, LoHaConfig(target_modules=["q_proj"]))


def test_weighted_adapters_are_refused_as_in_reference() -> None:
    with pytest.raises(NotImplementedError):
        _build(peftkit).add_weighted_adapter(["style"], [1.0], "combined")


def test_from_pretrained_trainable(tmp_path) -> None:
    _build(peftkit).save_pretrained(tmp_path, selected_adapters=["style"])
    model = PeftMixedModel.from_pretrained(_base(), tmp_path / "style", "style", is_trainable=True)
    assert model.active_adapters == ["style"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("hada_" in n and n.endswith(".style") for n in trainable)
    model.add_adapter("default", _configs(peftkit)["default"])  # a LoRA layer wraps the LoHa layer on q_proj
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, peftkit.methods.lora.LoraLayer)
    assert isinstance(q_proj.base_layer, peftkit.methods.loha.LoHaLayer)


def test_half_precision_base_keeps_adapters_in_float32() -> None:
    model = peftkit.get_peft_model(_base().to(torch.bfloat16), _configs(peftkit)["default"], mixed=True)
    model.add_adapter("style", _configs(peftkit)["style"])
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n or "hada_" in n}
    assert dtypes == {torch.float32}


def _conv_configs(lib) -> dict[str, object]:
    return {"default": lib.LoraConfig(target_modules=["conv", "lin0"], init_lora_weights=False),
            "style": lib.LoHaConfig(target_modules=["conv"], init_weights=False),
            "detail": lib.LoKrConfig(target_modules=["conv", "lin0"], init_weights=False)}


def _conv_base() -> nn.Module:
    from tests.models import Conv2dModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Conv2dModel().eval()


@pytest.mark.parametrize("names", ORDERS, ids="-".join)
def test_conv_layers_nest_and_match_reference(names: tuple[str, ...], tmp_path) -> None:
    """LoRA, LoHa and LoKr on one Conv2d (and a Linear), added in any order, saved, and loaded by the reference's
    mixed model in the one order it can build (LoRA first: the reference's LoRA conv layer fails with an
    ``AttributeError`` on a LoHa/LoKr conv layer, reading ``groups`` from it); the outputs agree."""
    from tests.models import conv2d_inputs

    configs = _conv_configs(peftkit)
    torch.manual_seed(1)
    ours = peftkit.get_peft_model(_conv_base(), configs[names[0]], adapter_name=names[0], mixed=True)
    for name in names[1:]:
        ours.add_adapter(name, configs[name])
    ours.set_adapter(list(names))
    ours.eval().save_pretrained(tmp_path)
    ref = peft.PeftMixedModel.from_pretrained(_conv_base(), str(tmp_path), "default")
    for name in NAMES[1:]:
        ref.load_adapter(str(tmp_path / name), name)
    ref.set_adapter(list(NAMES))
    x = conv2d_inputs(2)["x"]
    with torch.no_grad():
        assert not torch.allclose(ours(x), _conv_base()(x))
        # conv reductions: 3 * 3 * 3 = 27 terms, then 512 in the linear head
        torch.testing.assert_close(ours(x), ref.eval()(x), **fp_tol(torch.float32, 27 + 512))


# ------------------------------------------------------------------------------------------------ every method pair

_MIXABLE = [spec for spec in peftkit.all_methods() if spec.mixed_compatible]
_PAIRS = [(a, b) for a in _MIXABLE for b in _MIXABLE]


def _spec_config(spec, targets: list[str]):
    return spec.config_cls(**{**spec.example_configs[0], **spec.non_identity_kwargs, "target_modules": targets})


@pytest.mark.parametrize("first,second", _PAIRS, ids=[f"{a.peft_type}+{b.peft_type}" for a, b in _PAIRS])
def test_every_compatible_pair_mixes(first, second, tmp_path) -> None:
    """Registry-driven: any two mixed-compatible methods (a method registered later with ``mixed_compatible=True``
    gets this test) share a module; both apply, merging equals the unmerged output, files round-trip."""
    from tests.models import MLP, mlp_inputs

    def base() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return MLP().eval()

    x = mlp_inputs(3)["x"]
    torch.manual_seed(0)
    model = peftkit.get_peft_model(base(), _spec_config(first, ["lin0", "lin1"]), mixed=True)
    model.add_adapter("other", _spec_config(second, ["lin0"]))
    with torch.no_grad():
        only_first = model(x)
        model.set_adapter(["default", "other"])
        both = model(x).clone()
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base()(x), atol=0, rtol=0)  # same kernels on the same data
    assert not torch.allclose(both, only_first) and not torch.allclose(only_first, base()(x))
    model.save_pretrained(tmp_path)
    loaded = PeftMixedModel.from_pretrained(base(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    loaded.set_adapter(["default", "other"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), both, atol=0, rtol=0)  # same weights, same kernels
        merged = model.merge_and_unload()(x)
    torch.testing.assert_close(merged, both, **fp_tol(torch.float32, 10 + 20))  # W + ΔW: another summation order


def test_set_modules_to_save_trains_and_saves_the_copy(tmp_path) -> None:
    """``PeftMixedModel.set_modules_to_save`` (the reference's public method): the named module gets a trainable copy
    for the adapter, which is saved with it under the reference's keys and loads back in the reference."""
    model = _build(peftkit)
    model.set_modules_to_save(LoraConfig(modules_to_save=["lm_head"]), "default")
    head = model.get_base_model().lm_head
    assert type(head).__name__ == "ModulesToSaveWrapper"
    assert head.modules_to_save["default"].weight.requires_grad
    assert model.peft_config["default"].modules_to_save == ["lm_head"]
    with torch.no_grad():
        head.modules_to_save["default"].weight.mul_(2.0)
    expected = _logits(model)
    model.save_pretrained(str(tmp_path))
    assert "base_model.model.lm_head.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))

    ref = peft.PeftMixedModel.from_pretrained(_base(), str(tmp_path))
    ref.load_adapter(str(tmp_path / "style"), "style")
    ref.load_adapter(str(tmp_path / "detail"), "detail")
    ref.set_adapter(list(NAMES))
    torch.testing.assert_close(_logits(ref.eval()), expected, **TOL)


def test_set_modules_to_save_bad_input_changes_nothing() -> None:
    model = _build(peftkit)
    before = str(model)
    with pytest.raises(AdapterNotFoundError):
        model.set_modules_to_save(LoraConfig(modules_to_save=["lm_head"]), "nope")
    with pytest.raises(ValueError, match="modules_to_save"):
        model.set_modules_to_save(LoraConfig(modules_to_save=["no_such_module"]), "default")
    assert str(model) == before
