"""Hot-swapping a loaded LoRA adapter in place (``peftkit.hotswap``).

Properties:
- after ``hotswap_adapter(model, dir_b, "default")`` the model computes what ``PeftModel.from_pretrained(base,
  dir_b)`` computes (within the float32 tolerance ``TOL``), with the same module and parameter objects (ids) as
  before; different alpha, rsLoRA, rank/alpha patterns and smaller ranks (zero-padded) all match;
- ``prepare_model_for_compiled_hotswap`` leaves outputs unchanged, pads to ``target_rank`` and turns scalings into
  tensors; a ``torch.compile``'d model then swaps back and forth without recompiling (a counting backend sees one
  compilation) and matches the un-compiled model with each adapter (``TOL``); without the preparation a swap to
  another alpha does recompile (so the counter can catch it);
- every incompatibility raises a typed error before anything is written.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from models import CASES_BY_NAME, MLP, TaskCase, model_output
from numerics import fp_tol
from safetensors.torch import load_file

from peftkit import (
    AdapterLoadError,
    AdapterMismatchError,
    AdapterNotFoundError,
    ConfigError,
    LoraConfig,
    MergeError,
    PeftModel,
    PeftWarning,
    ShapeMismatchError,
    get_peft_model,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    inject_adapter_in_model,
    prepare_model_for_compiled_hotswap,
)
from peftkit.methods.lora.layers import LoraLayer, lora_scaling

# A swapped-in adapter is computed by another code path than a freshly loaded one (zero-padded to the loaded rank:
# another blocking; a tensor scaling), by inductor's kernels when compiled, by the reference's two matmuls where
# peftkit fuses an addmm: float32, a few ulp per term of the longest path of the swapped models (custom-conv2d: a
# 3x3 conv over 3 channels, then 8 * 8 * 8 features into lin0, rank 8)
TOL = fp_tol(torch.float32, 27 + 512 + 8)
ATOL = ATOL_COMPILED = TOL["atol"]

#: (case name, targets) of the models swapped on: linear, embedding, conv and a transformers model
SWAP_CASES = ["custom-mlp", "custom-emb", "custom-conv2d", "llama-causal"]


def _targets(case: TaskCase) -> list[str]:
    return ["lin0", "lin1"] if case.name == "custom-mlp" else list(case.target_modules)


def _save(tmp_path, case: TaskCase, name: str, seed: int, **lora) -> str:
    """Save an adapter with random (non-identity) weights built from ``lora`` kwargs; return its directory."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(target_modules=lora.pop("target_modules", _targets(case)), init_lora_weights=False,
                            **lora)
        model = get_peft_model(case.build(), config)
    path = str(tmp_path / name)
    model.save_pretrained(path)
    return path


def _output(model, case: TaskCase, batch: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model(**case.make_inputs(batch)), case.output_key)


def _loaded_output(case: TaskCase, path: str) -> torch.Tensor:
    """Output of a fresh base model with the adapter in ``path`` loaded normally."""
    return _output(PeftModel.from_pretrained(case.build(), path).eval(), case)


def _ids(model) -> tuple[list[int], list[int]]:
    return [id(m) for m in model.modules()], [id(p) for p in model.parameters()]


def _lora_layers(model) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


# ---------------------------------------------------------------------------------------------- swapping
def _second_adapter(kind: str, case: TaskCase) -> dict:
    """LoRA kwargs of the adapter swapped in: another alpha, a smaller rank, or rsLoRA with rank/alpha patterns."""
    targets = _targets(case)
    return {
        "alpha": {"r": 8, "lora_alpha": 32},
        "smaller-rank": {"r": 2, "lora_alpha": 6},
        "rslora-patterns": {"r": 8, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {targets[0]: 4},
                            "alpha_pattern": {targets[-1]: 3}},
    }[kind]


SECOND_ADAPTERS = ["alpha", "smaller-rank", "rslora-patterns"]


@pytest.mark.parametrize("second", SECOND_ADAPTERS)
@pytest.mark.parametrize("case_name", SWAP_CASES)
def test_swap_equals_normal_loading_and_keeps_objects(tmp_path, case_name, second):
    case = CASES_BY_NAME[case_name]
    path_a = _save(tmp_path, case, "a", seed=1, r=8, lora_alpha=16)
    path_b = _save(tmp_path, case, "b", seed=2, **_second_adapter(second, case))
    expected_a, expected_b = _loaded_output(case, path_a), _loaded_output(case, path_b)
    assert (expected_a - expected_b).abs().max() > 1e-3  # the two adapters compute different things

    model = PeftModel.from_pretrained(case.build(), path_a).eval()
    modules_before, params_before = _ids(model)
    torch.testing.assert_close(_output(model, case), expected_a, **TOL)

    hotswap_adapter(model, path_b, adapter_name="default")
    torch.testing.assert_close(_output(model, case), expected_b, **TOL)
    assert _ids(model) == (modules_before, params_before)

    hotswap_adapter(model, path_a, adapter_name="default")  # and back (the zero padding is undone too)
    torch.testing.assert_close(_output(model, case), expected_a, **TOL)
    assert _ids(model) == (modules_before, params_before)


def test_swap_sets_scaling_alpha_and_stored_config(tmp_path):
    case = CASES_BY_NAME["custom-mlp"]
    path_a = _save(tmp_path, case, "a", seed=1, r=8, lora_alpha=16)
    path_b = _save(tmp_path, case, "b", seed=2, **_second_adapter("rslora-patterns", case))
    model = PeftModel.from_pretrained(case.build(), path_a)
    hotswap_adapter(model, path_b, "default")
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert lin0.scaling["default"] == pytest.approx(8 / 4**0.5)  # rank_pattern lin0 -> 4, alpha 8, rsLoRA
    assert lin1.scaling["default"] == pytest.approx(3 / 8**0.5)  # alpha_pattern lin1 -> 3, rank 8
    for layer in (lin0, lin1):  # the layer's own (r, alpha, rslora) still give its scaling: set_scale stays right
        assert lora_scaling(layer.r["default"], layer.lora_alpha["default"], layer.use_rslora["default"]) == (
            pytest.approx(layer.scaling["default"]))
    assert lin0.r["default"] == 8 and lin0.lora_A["default"].weight.shape == (8, 10)  # kept, zero-padded
    assert torch.count_nonzero(lin0.lora_A["default"].weight[4:]) == 0
    assert torch.count_nonzero(lin0.lora_B["default"].weight[:, 4:]) == 0
    stored = model.peft_config["default"]
    assert (stored.use_rslora, stored.lora_alpha, stored.alpha_pattern, stored.rank_pattern) == (
        True, 8, {"lin1": 3}, {"lin0": 4})


def test_same_rank_swap_saves_the_new_adapter(tmp_path):
    """After a same-rank swap, save_pretrained writes the new adapter (weights and scaling-relevant config)."""
    case = CASES_BY_NAME["custom-mlp"]
    path_a = _save(tmp_path, case, "a", seed=1, r=4, lora_alpha=8)
    path_b = _save(tmp_path, case, "b", seed=2, r=4, lora_alpha=2, use_rslora=True)
    model = PeftModel.from_pretrained(case.build(), path_a)
    hotswap_adapter(model, path_b, "default")
    model.save_pretrained(tmp_path / "resaved")
    saved, original = load_file(tmp_path / "resaved" / "adapter_model.safetensors"), load_file(
        os.path.join(path_b, "adapter_model.safetensors"))
    assert saved.keys() == original.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], original[key], atol=0, rtol=0)
    torch.testing.assert_close(_loaded_output(case, str(tmp_path / "resaved")), _loaded_output(case, path_b),
                               **TOL)


def test_swap_from_state_dict_with_in_memory_keys_and_injected_model(tmp_path):
    """The low-level function takes reference-style keys (adapter name inside) and works on injected models."""
    case = CASES_BY_NAME["custom-mlp"]
    path_b = _save(tmp_path, case, "b", seed=2, r=4, lora_alpha=12)
    expected = _loaded_output(case, path_b)
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8), case.build(),
                                    adapter_name="other").eval()
    weights = load_file(os.path.join(path_b, "adapter_model.safetensors"))
    in_memory = {k.replace("base_model.model.", "").replace(".weight", ".other.weight"): v for k, v in weights.items()}
    assert "lin0.lora_A.other.weight" in in_memory
    hotswap_adapter_from_state_dict(model, in_memory, "other", LoraConfig.from_pretrained(path_b))
    torch.testing.assert_close(_output(model, case), expected, **TOL)


# ---------------------------------------------------------------------------------------------- compiled models
def _counting_backend(counter: list[int]):
    """A torch.compile backend that counts compilations (each call compiles one graph) and runs aot_eager."""

    def backend(gm, example_inputs):
        counter[0] += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    return backend


def test_prepare_keeps_outputs_pads_and_makes_tensor_scalings(tmp_path):
    case = CASES_BY_NAME["llama-causal"]
    path = _save(tmp_path, case, "a", seed=1, r=4, lora_alpha=8, rank_pattern={"v_proj": 2})
    model = PeftModel.from_pretrained(case.build(), path).eval()
    before = _output(model, case)
    user_config = LoraConfig(r=4, rank_pattern={"v_proj": 2})
    with pytest.warns(PeftWarning, match="does not modify the config you pass"):
        prepare_model_for_compiled_hotswap(model, target_rank=6, config=user_config)
    assert (user_config.r, user_config.rank_pattern) == (4, {"v_proj": 2})  # never mutated
    config = model.peft_config["default"]  # the model's own copy records the padded rank
    torch.testing.assert_close(_output(model, case), before, **TOL)
    for layer in _lora_layers(model):
        scaling = layer.scaling["default"]
        assert isinstance(scaling, torch.Tensor) and scaling.dim() == 0 and scaling.dtype == torch.float32
        assert layer.r["default"] == 6 and layer.lora_A["default"].weight.shape[0] == 6
        assert layer.lora_B["default"].weight.shape[1] == 6 and layer.lora_A["default"].out_features == 6
        assert float(scaling) == pytest.approx(lora_scaling(layer.r["default"], layer.lora_alpha["default"], False))
    assert float(model.base_model.model.model.layers[0].self_attn.v_proj.scaling["default"]) == 4.0  # 8 / 2
    assert (config.r, config.rank_pattern) == (6, {"v_proj": 6})


@pytest.mark.parametrize("case_name", ["custom-mlp", "llama-causal"])
def test_compiled_model_swaps_without_recompiling(tmp_path, case_name):
    case = CASES_BY_NAME[case_name]
    path_a = _save(tmp_path, case, "a", seed=1, r=4, lora_alpha=8)
    path_b = _save(tmp_path, case, "b", seed=2, r=8, lora_alpha=32, use_rslora=True)
    expected_a, expected_b = _loaded_output(case, path_a), _loaded_output(case, path_b)

    model = PeftModel.from_pretrained(case.build(), path_a).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch._dynamo.reset()
    compilations = [0]
    compiled = torch.compile(model, backend=_counting_backend(compilations))
    torch.testing.assert_close(_output(compiled, case), expected_a, **TOL)
    after_first = compilations[0]
    assert after_first >= 1

    hotswap_adapter(compiled, path_b, "default")
    torch.testing.assert_close(_output(compiled, case), expected_b, **TOL)
    hotswap_adapter(compiled, path_a, "default")
    torch.testing.assert_close(_output(compiled, case), expected_a, **TOL)
    assert compilations[0] == after_first
    torch._dynamo.reset()


def test_without_preparation_a_swap_recompiles(tmp_path):
    """The counter can fail: float scalings are graph constants, so a new alpha forces a recompilation."""
    case = CASES_BY_NAME["custom-mlp"]
    path_a = _save(tmp_path, case, "a", seed=1, r=4, lora_alpha=8)
    path_b = _save(tmp_path, case, "b", seed=2, r=4, lora_alpha=32)
    model = PeftModel.from_pretrained(case.build(), path_a).eval()
    torch._dynamo.reset()
    compilations = [0]
    compiled = torch.compile(model, backend=_counting_backend(compilations))
    _output(compiled, case)
    after_first = compilations[0]
    hotswap_adapter(compiled, path_b, "default")
    torch.testing.assert_close(_output(compiled, case), _loaded_output(case, path_b), **TOL)
    assert compilations[0] > after_first
    torch._dynamo.reset()


def test_check_compiled_modes(tmp_path):
    case = CASES_BY_NAME["custom-mlp"]
    path = _save(tmp_path, case, "a", seed=1, r=4, lora_alpha=8)
    model = PeftModel.from_pretrained(case.build(), path)
    compiled = torch.compile(model, backend="eager")  # compiling is lazy: nothing runs here
    with pytest.raises(ConfigError, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(compiled)
    assert isinstance(model.base_model.model.lin0.scaling["default"], float)  # unchanged by the refusal
    with pytest.warns(PeftWarning, match="already compiled"):
        prepare_model_for_compiled_hotswap(compiled, check_compiled="warn")
    assert isinstance(model.base_model.model.lin0.scaling["default"], torch.Tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_model_for_compiled_hotswap(compiled, check_compiled="ignore")
    with pytest.raises(ConfigError, match="check_compiled"):
        prepare_model_for_compiled_hotswap(model, check_compiled="maybe")
    with pytest.raises(ConfigError, match="target_rank"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)  # smaller than the loaded rank 4
    with pytest.raises(ConfigError, match="no LoRA layers"):
        prepare_model_for_compiled_hotswap(MLP())


# ---------------------------------------------------------------------------------------------- errors
def _assert_unchanged(model, case, expected):
    torch.testing.assert_close(_output(model, case), expected, atol=0, rtol=0)


def test_subset_adapter_zeroes_the_other_modules_and_superset_raises(tmp_path):
    """As in the reference: an adapter targeting a subset of the loaded modules swaps in, and the LoRA tensors of
    the modules it lacks become 0 (those modules compute the base output); a module the loaded adapter lacks is
    refused before anything is written (RuntimeError as in the reference, and ValueError)."""
    case = CASES_BY_NAME["custom-mlp"]
    both = _save(tmp_path, case, "both", seed=1, r=4, lora_alpha=8)
    only_lin0 = _save(tmp_path, case, "lin0", seed=2, r=4, lora_alpha=8, target_modules=["lin0"])
    model = PeftModel.from_pretrained(case.build(), both).eval()
    ids_before = _ids(model)
    hotswap_adapter(model, only_lin0, "default")
    torch.testing.assert_close(_output(model, case), _loaded_output(case, only_lin0), **TOL)
    lin1 = model.base_model.model.lin1
    assert torch.count_nonzero(lin1.lora_A["default"].weight) == 0
    assert torch.count_nonzero(lin1.lora_B["default"].weight) == 0
    assert _ids(model) == ids_before
    hotswap_adapter(model, both, "default")  # and back: lin1 gets its weights again
    torch.testing.assert_close(_output(model, case), _loaded_output(case, both), **TOL)

    small = PeftModel.from_pretrained(case.build(), only_lin0).eval()
    before = _output(small, case)
    with pytest.raises(RuntimeError, match=r"modules the loaded one does not adapt: \['lin1'\]") as info:
        hotswap_adapter(small, both, "default")
    assert isinstance(info.value, AdapterLoadError)
    _assert_unchanged(small, case, before)


def test_larger_rank_swaps_in_place_on_an_uncompiled_model(tmp_path):
    """As in the reference, a larger rank swaps in on an uncompiled model: the parameter objects stay (ids) and take
    the new shape; the layer's ``r`` and the factor modules' feature counts follow; no warning (nothing compiled)."""
    case = CASES_BY_NAME["custom-mlp"]
    path_small = _save(tmp_path, case, "small", seed=1, r=2, lora_alpha=8)
    path_big = _save(tmp_path, case, "big", seed=2, r=8, lora_alpha=8, rank_pattern={"lin1": 6})
    model = PeftModel.from_pretrained(case.build(), path_small).eval()
    ids_before = _ids(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hotswap_adapter(model, path_big, "default")
    torch.testing.assert_close(_output(model, case), _loaded_output(case, path_big), **TOL)
    assert _ids(model) == ids_before
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert (lin0.r["default"], lin1.r["default"]) == (8, 6)
    assert lin0.lora_A["default"].weight.shape == (8, 10) and lin0.lora_A["default"].out_features == 8
    assert lin1.lora_B["default"].weight.shape == (2, 6) and lin1.lora_B["default"].in_features == 6
    for layer in (lin0, lin1):
        assert layer.scaling["default"] == pytest.approx(8 / layer.r["default"])
    hotswap_adapter(model, path_small, "default")  # back to the smaller rank: zero-padded
    torch.testing.assert_close(_output(model, case), _loaded_output(case, path_small), **TOL)


def test_larger_rank_into_a_compiled_model_warns_that_it_recompiles(tmp_path):
    case = CASES_BY_NAME["custom-mlp"]
    path_small = _save(tmp_path, case, "small", seed=1, r=2, lora_alpha=8)
    path_big = _save(tmp_path, case, "big", seed=2, r=8, lora_alpha=8)
    model = PeftModel.from_pretrained(case.build(), path_small).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    _output(compiled, case)
    with pytest.warns(PeftWarning, match=r"recompiles.*prepare_model_for_compiled_hotswap\(model, target_rank=8\)"):
        hotswap_adapter(compiled, path_big, "default")
    torch.testing.assert_close(_output(compiled, case), _loaded_output(case, path_big), **TOL)
    torch._dynamo.reset()


def test_unknown_adapter_merged_adapter_and_other_errors(tmp_path):
    case = CASES_BY_NAME["custom-mlp"]
    path_a = _save(tmp_path, case, "a", seed=1, r=4, lora_alpha=8)
    path_b = _save(tmp_path, case, "b", seed=2, r=4, lora_alpha=8)
    model = PeftModel.from_pretrained(case.build(), path_a).eval()
    with pytest.raises(AdapterNotFoundError, match="'nope'"):
        hotswap_adapter(model, path_b, "nope")
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        hotswap_adapter(model, path_b, "default", low_cpu_mem_usage=True)

    other_type = LoraConfig.from_pretrained(path_b)
    other_type.peft_type = "IA3"
    with pytest.raises(ConfigError, match="peft_type"):
        hotswap_adapter_from_state_dict(model, load_file(os.path.join(path_b, "adapter_model.safetensors")),
                                        "default", other_type)

    config_path = os.path.join(path_b, "adapter_config.json")  # config says r=2, tensors have rank 4
    with open(config_path, encoding="utf-8") as fh:
        data = json.load(fh)
    data["r"] = 2
    with open(config_path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    with pytest.raises(AdapterMismatchError, match="r: 2 in adapter_config.json but 4 with the weights"):
        hotswap_adapter(model, path_b, "default")  # the files disagree: caught before hotswap's own checks
    with pytest.raises(AdapterLoadError, match="r=2"):  # hotswap's check of a config against tensors
        hotswap_adapter_from_state_dict(model, load_file(os.path.join(path_b, "adapter_model.safetensors")),
                                        "default", LoraConfig.from_pretrained(path_b))

    model.merge_adapter()
    merged_output = _output(model, case)
    with pytest.raises(MergeError, match="unmerge_adapter"):
        hotswap_adapter(model, path_a, "default")
    _assert_unchanged(model, case, merged_output)


def test_shape_mismatch_outside_rank_raises(tmp_path):
    """A tensor whose non-rank dimension differs (another model) is refused before anything is written."""
    case = CASES_BY_NAME["custom-mlp"]
    path = _save(tmp_path, case, "a", seed=1, r=4, lora_alpha=8)
    model = PeftModel.from_pretrained(case.build(), path).eval()
    before = _output(model, case)
    weights = load_file(os.path.join(path, "adapter_model.safetensors"))
    weights["base_model.model.lin0.lora_A.weight"] = torch.zeros(4, 11)
    with pytest.raises(ShapeMismatchError, match="lin0.lora_A.weight"):
        hotswap_adapter_from_state_dict(model, weights, "default", LoraConfig.from_pretrained(path))
    _assert_unchanged(model, case, before)


# ---------------------------------------------------------------------------------------------- interop
def test_swap_in_an_adapter_saved_by_the_reference(tmp_path):
    peft = pytest.importorskip("peft")
    case = CASES_BY_NAME["custom-mlp"]
    torch.manual_seed(3)
    ref = peft.get_peft_model(case.build(), peft.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=24,
                                                            init_lora_weights=False)).eval()
    ref.save_pretrained(tmp_path / "ref")
    expected = _output(ref, case)
    model = PeftModel.from_pretrained(case.build(), _save(tmp_path, case, "a", seed=1, r=4, lora_alpha=8)).eval()
    hotswap_adapter(model, str(tmp_path / "ref"), "default")
    torch.testing.assert_close(_output(model, case), expected, **TOL)


ATOL_INTEROP = TOL["atol"]  # across the two libraries: see TOL


@pytest.mark.interop
def test_subset_and_larger_rank_adapter_saved_by_the_reference_swaps_as_in_the_reference(tmp_path):
    """Both reference-saved adapters: the loaded one targets lin0 and lin1 at rank 2, the new one only lin0 at rank 8.
    peftkit's swap computes what the reference's own hotswap_adapter computes, and what loading it normally gives."""
    peft = pytest.importorskip("peft")
    from peft.utils.hotswap import hotswap_adapter as ref_hotswap_adapter

    case = CASES_BY_NAME["custom-mlp"]
    for name, seed, kwargs in (("a", 1, {"target_modules": ["lin0", "lin1"], "r": 2}),
                               ("b", 2, {"target_modules": ["lin0"], "r": 8})):
        torch.manual_seed(seed)
        ref = peft.get_peft_model(case.build(), peft.LoraConfig(lora_alpha=8, init_lora_weights=False, **kwargs))
        ref.save_pretrained(tmp_path / name)
    path_a, path_b = str(tmp_path / "a"), str(tmp_path / "b")

    ref_model = peft.PeftModel.from_pretrained(case.build(), path_a).eval()
    ref_hotswap_adapter(ref_model, path_b, "default", torch_device="cpu")
    expected = _output(ref_model, case)

    model = PeftModel.from_pretrained(case.build(), path_a).eval()
    hotswap_adapter(model, path_b, "default")
    torch.testing.assert_close(_output(model, case), expected, **TOL)
    torch.testing.assert_close(_output(model, case), _loaded_output(case, path_b), **TOL)


@pytest.mark.interop
def test_reference_swaps_subset_and_larger_rank_adapters_saved_by_peftkit(tmp_path):
    """The other direction: adapters saved by peftkit, swapped by the reference and by peftkit, give one output."""
    peft = pytest.importorskip("peft")
    from peft.utils.hotswap import hotswap_adapter as ref_hotswap_adapter

    case = CASES_BY_NAME["custom-mlp"]
    path_a = _save(tmp_path, case, "a", seed=1, r=2, lora_alpha=8)
    path_b = _save(tmp_path, case, "b", seed=2, r=8, lora_alpha=8, target_modules=["lin0"])
    ref_model = peft.PeftModel.from_pretrained(case.build(), path_a).eval()
    ref_hotswap_adapter(ref_model, path_b, "default", torch_device="cpu")
    model = PeftModel.from_pretrained(case.build(), path_a).eval()
    hotswap_adapter(model, path_b, "default")
    torch.testing.assert_close(_output(model, case), _output(ref_model, case), **TOL)


def test_adapter_lacking_the_loaded_modules_to_save_copy_is_refused(tmp_path):
    """Unlike the reference (which keeps the old copy silently), a new adapter without the loaded adapter's
    modules_to_save copy is refused before anything is written."""
    from peftkit.hotswap import HotswapKeyError

    case = CASES_BY_NAME["custom-mlp"]
    with_copy = _save(tmp_path, case, "a", seed=1, r=4, lora_alpha=8, target_modules=["lin0"], modules_to_save=["lin1"])
    without = _save(tmp_path, case, "b", seed=2, r=4, lora_alpha=8, target_modules=["lin0"])
    model = PeftModel.from_pretrained(case.build(), with_copy).eval()
    before = _output(model, case)
    with pytest.raises(HotswapKeyError, match="modules_to_save"):
        hotswap_adapter(model, without, "default")
    _assert_unchanged(model, case, before)
