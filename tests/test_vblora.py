"""VB-LoRA (``VBLoRAConfig``): the factor assembly against a plain loop implementation, interop with the reference
both ways (tiny Llama, BERT, GPT-2 ``Conv1D``, a custom MLP; full logits and ``save_only_topk_weights``), the bank
held once per model, merge/unmerge, savable-parameter counts and typed config errors."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.vblora import VBLoRALayer
from tests.models import MLP, tiny_bert, tiny_gpt2, tiny_llama
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")

#: both libraries run the same float32 model with their own (differently ordered) matmuls: a few ulp per term of the
#: longest reductions of the tiny models (tests/numerics.py); tighter than the issue's 1e-5
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)


# ------------------------------------------------------------------------------------------------ plain reference


def plain_factors(logits_A: torch.Tensor, logits_B: torch.Tensor, bank: torch.Tensor, topk: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's assembly, one sub-vector at a time in float64: slice ``t`` of row ``i`` of ``A: (r, in)`` is
    ``Σ_j softmax(top-k logits)_j · bank[idx_j]``; likewise slice ``t`` of column ``i`` of ``B: (out, r)``."""
    bank = bank.double()
    length = bank.shape[1]

    def mix(logits: torch.Tensor) -> torch.Tensor:
        order = sorted(range(logits.numel()), key=lambda j: -float(logits[j]))[:topk]
        top = logits.double()[order]
        weights = torch.exp(top - top.max()) / torch.exp(top - top.max()).sum()
        return sum(w * bank[j] for w, j in zip(weights, order))

    r, in_tiles, _ = logits_A.shape
    out_tiles = logits_B.shape[0]
    A = torch.zeros(r, in_tiles * length, dtype=torch.float64)
    B = torch.zeros(out_tiles * length, r, dtype=torch.float64)
    for i in range(r):
        for t in range(in_tiles):
            A[i, t * length:(t + 1) * length] = mix(logits_A[i, t])
        for t in range(out_tiles):
            B[t * length:(t + 1) * length, i] = mix(logits_B[t, i])
    return A, B


def _layers(model: nn.Module) -> list[VBLoRALayer]:
    return [m for m in model.modules() if isinstance(m, VBLoRALayer)]


@pytest.mark.parametrize("topk", [1, 2, 3])
def test_layer_output_matches_plain_factors(topk: int) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 8)
    model = peftkit.get_peft_model(nn.Sequential(base), peftkit.VBLoRAConfig(
        r=3, num_vectors=6, vector_length=4, topk=topk, target_modules=["0"]))
    layer = _layers(model)[0]
    bank = model.base_model.vblora_vector_bank["default"].detach()
    A, B = plain_factors(layer.vblora_logits_A["default"].detach(), layer.vblora_logits_B["default"].detach(),
                         bank, topk)
    x = torch.randn(2, 5, 12)
    expected = x.double() @ base.weight.double().T + base.bias.double() + x.double() @ A.T @ B.T
    # float32 layer against float64: 12-term dot products (base and x @ A.T) plus a 3-term product and k-term mixes
    torch.testing.assert_close(layer(x).double(), expected, **fp_tol(torch.float32, 16))
    delta = layer.get_delta_weight("default").double()
    torch.testing.assert_close(delta, B @ A, **fp_tol(torch.float32, 4))


def test_bank_is_held_once_and_shared_by_every_layer() -> None:
    model = peftkit.get_peft_model(_llama(), peftkit.VBLoRAConfig(
        r=2, num_vectors=8, vector_length=4, target_modules=["q_proj", "v_proj"]))
    holder = model.base_model.vblora_vector_bank
    assert all(layer.vblora_vector_bank is holder for layer in _layers(model))
    banks = [n for n, _ in model.named_parameters() if "vblora_vector_bank" in n]
    assert banks == ["base_model.vblora_vector_bank.default"]
    assert holder["default"].requires_grad
    model.add_adapter("other", peftkit.VBLoRAConfig(r=2, num_vectors=4, vector_length=4,
                                                    target_modules=["q_proj"]))
    assert set(holder.keys()) == {"default", "other"} and not holder["other"].requires_grad
    keys = set(peftkit.get_peft_model_state_dict(model, adapter_name="other"))
    assert "base_model.vblora_vector_bank" in keys and all("v_proj" not in k for k in keys)
    model.delete_adapter("other")
    assert set(holder.keys()) == {"default"}


def test_bank_trains_and_gets_gradients_from_every_layer() -> None:
    model = peftkit.get_peft_model(_llama().train(), peftkit.VBLoRAConfig(
        r=2, num_vectors=8, vector_length=4, target_modules=["q_proj", "v_proj"]))
    model(input_ids=_ids()).logits.sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("vblora_" in n for n in trainable)
    assert model.base_model.vblora_vector_bank["default"].grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ interop


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama().eval()


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return tiny_bert("FEATURE_EXTRACTION").eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return tiny_gpt2().eval()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))


#: name -> (build, target_modules, vector_length, inputs, output)
MODELS = {
    "llama": (_llama, ["q_proj", "v_proj", "up_proj"], 4, lambda: {"input_ids": _ids()}, lambda o: o.logits),
    "bert": (_bert, ["query", "value"], 8, lambda: {"input_ids": _ids()}, lambda o: o.last_hidden_state),
    "gpt2": (_gpt2, ["c_attn", "c_fc"], 8, lambda: {"input_ids": _ids()}, lambda o: o.logits),
    "mlp": (_mlp, ["lin0", "lin1"], 2, lambda: {"x": torch.randn(3, 10, generator=torch.Generator().manual_seed(1))},
            lambda o: o),
}
INTEROP = [pytest.param(m, topk_only, id=f"{m}-{'topk' if topk_only else 'full'}")
           for m in MODELS for topk_only in (False, True) if m in ("llama", "gpt2") or not topk_only]


def _perturb(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vblora_vector_bank" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)
            elif "vblora_logits" in name:
                param.add_(torch.randn(param.shape, generator=gen))


def _run(model: nn.Module, name: str) -> torch.Tensor:
    _, _, _, inputs, output = MODELS[name]
    with torch.no_grad():
        return output(model(**inputs()))


def _config(lib, name: str, topk_only: bool):
    _, targets, length, _, _ = MODELS[name]
    return lib.VBLoRAConfig(r=3, num_vectors=10, vector_length=length, topk=2, target_modules=targets,
                            save_only_topk_weights=topk_only, fan_in_fan_out=name == "gpt2")


def _saved(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _essentials(config) -> tuple:
    return (getattr(config.peft_type, "value", config.peft_type), config.r, config.num_vectors, config.vector_length,
            config.topk, config.save_only_topk_weights, set(config.target_modules))




@pytest.mark.parametrize(("name", "topk_only"), INTEROP)
def test_peftkit_file_loads_in_reference(name: str, topk_only: bool, tmp_path) -> None:
    build = MODELS[name][0]
    model = peftkit.get_peft_model(build(), _config(peftkit, name, topk_only)).eval()
    _perturb(model)
    model.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's fan_in_fan_out warning for Conv1D
        ref = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    ours = _saved(str(tmp_path))
    theirs = peft.get_peft_model_state_dict(ref)
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
    assert "base_model.vblora_vector_bank" in ours
    assert _essentials(ref.peft_config["default"]) == _essentials(model.peft_config["default"])
    torch.testing.assert_close(_run(ref, name), _run(model, name), **TOL)
    assert not torch.allclose(_run(ref, name), _run(build(), name), atol=1e-3)  # the adapter is not identity


@pytest.mark.parametrize(("name", "topk_only"), INTEROP)
def test_reference_file_loads_in_peftkit(name: str, topk_only: bool, tmp_path) -> None:
    build = MODELS[name][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(build(), _config(peft, name, topk_only)).eval()
    _perturb(ref)
    ref.save_pretrained(str(tmp_path))
    model = peftkit.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    assert set(peftkit.get_peft_model_state_dict(model)) == set(_saved(str(tmp_path)))
    assert _essentials(model.peft_config["default"]) == _essentials(ref.peft_config["default"])
    torch.testing.assert_close(_run(model, name), _run(ref, name), **TOL)
    if not topk_only:  # the full logits round-trip exactly
        ours, theirs = peftkit.get_peft_model_state_dict(model), peft.get_peft_model_state_dict(ref)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_topk_only_adapter_refuses_training(tmp_path) -> None:
    model = peftkit.get_peft_model(_llama(), _config(peftkit, "llama", True))
    model.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(_llama(), str(tmp_path), is_trainable=True).train()
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        loaded(input_ids=_ids())


def test_reference_topk_file_loads_without_non_finite_warning(tmp_path) -> None:
    """The reference restores the logits outside the top-k as ``-inf``, so every such load would warn that the
    checkpoint is corrupt; peftkit restores them as the lowest finite float (same outputs, no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(_llama(), _config(peft, "llama", True))
    ref.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.PeftWarning)
        model = peftkit.PeftModel.from_pretrained(_llama(), str(tmp_path)).eval()
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "vblora_logits" in n)


def test_savable_parameter_counts_match_reference() -> None:
    for topk_only in (False, True):
        ours = peftkit.get_peft_model(_llama(), _config(peftkit, "llama", topk_only))
        theirs = peft.get_peft_model(_llama(), _config(peft, "llama", topk_only))
        assert ours.base_model.get_nb_savable_parameters() == theirs.base_model.get_nb_savable_parameters()


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_unmerge_and_unload(name: str) -> None:
    build = MODELS[name][0]
    model = peftkit.get_peft_model(build(), _config(peftkit, name, False)).eval()
    _perturb(model)
    base_out, out = _run(build(), name), _run(model, name)
    model.merge_adapter()
    # merged: W + B A as one matmul against two low-rank matmuls: a few ulp over the model's reductions
    torch.testing.assert_close(_run(model, name), out, **TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(_run(model, name), out, **TOL)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_run(merged, name), out, **TOL)
    assert not torch.allclose(out, base_out, atol=1e-3)


# ------------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"),
    ({"num_vectors": 0}, "num_vectors"),
    ({"vector_length": -1}, "vector_length"),
    ({"topk": 0}, "topk"),
    ({"topk": 5, "num_vectors": 4}, "topk"),
    ({"vblora_dropout": 1.5}, "vblora_dropout"),
    ({"bias": "lora_only"}, "bias"),
    ({"save_only_topk_weights": "yes"}, "save_only_topk_weights"),
    ({"init_logits_std": -1.0}, "init_logits_std"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
])
def test_bad_config_values_raise_typed_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        peftkit.VBLoRAConfig(**kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_vector_length_must_divide_layer_sizes() -> None:
    with pytest.raises(ConfigError, match="in_features") as info:
        peftkit.get_peft_model(MLP(), peftkit.VBLoRAConfig(vector_length=4, target_modules=["lin0"]))
    assert info.value.field == "vector_length"


def test_unsupported_module_kind_is_refused() -> None:
    model = nn.Sequential(nn.Embedding(10, 8))
    with pytest.raises(UnsupportedModuleError, match="Linear"):
        peftkit.get_peft_model(model, peftkit.VBLoRAConfig(vector_length=4, target_modules=["0"]))


def test_mixed_batch_rows_match_single_adapter_runs() -> None:
    model = peftkit.get_peft_model(_llama(), _config(peftkit, "llama", False)).eval()
    model.add_adapter("other", _config(peftkit, "llama", False))
    _perturb(model, seed=4)
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["other", "__base__", "default"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(input_ids=ids[row:row + 1]).logits
            else:
                model.set_adapter(name)
                single = model(input_ids=ids[row:row + 1]).logits
            # the same layers on a row subset: batched matmuls may block differently
            torch.testing.assert_close(mixed[row:row + 1], single, **TOL)


@pytest.mark.parametrize("topk_only", [False, True], ids=["full", "topk"])
def test_inspect_measures_each_layer_with_the_shared_bank(topk_only: bool, tmp_path) -> None:
    from peftkit.cli.inspect_cmd import inspect_adapter

    model = peftkit.get_peft_model(_llama(), _config(peftkit, "llama", topk_only)).eval()
    _perturb(model)
    model.save_pretrained(str(tmp_path))
    info = inspect_adapter(str(tmp_path))
    layers = {layer["module"]: layer for layer in info["layers"]}
    expected = {name.removeprefix("base_model.model."): module.get_delta_weight("default").double().norm()
                for name, module in model.named_modules() if isinstance(module, VBLoRALayer)}
    assert len(layers) == len(expected) == 6  # 2 layers x (q, v, up); the bank is no layer
    for name, norm in expected.items():
        # float32 layer deltas against the float64 measure (a top-k restore is exact up to log/exp rounding)
        torch.testing.assert_close(torch.tensor(layers[name]["norm"], dtype=torch.float64), norm, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bias", ["vblora_only", "all"])
def test_trained_biases_save_as_the_reference(bias: str, tmp_path) -> None:
    kwargs = {"r": 2, "num_vectors": 6, "vector_length": 2, "target_modules": ["lin0"], "bias": bias}
    model = peftkit.get_peft_model(_mlp(), peftkit.VBLoRAConfig(**kwargs)).eval()
    ref = peft.get_peft_model(_mlp(), peft.VBLoRAConfig(**kwargs)).eval()
    assert set(peftkit.get_peft_model_state_dict(model)) == set(peft.get_peft_model_state_dict(ref))
    assert ({n for n, p in model.named_parameters() if p.requires_grad}
            == {n for n, p in ref.named_parameters() if p.requires_grad and "vblora_vector_bank" not in n}
            | {"base_model.vblora_vector_bank.default"})
    with torch.no_grad():
        model.base_model.model.lin0.base_layer.bias.add_(1.0)
    _perturb(model)
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(_mlp(), str(tmp_path)).eval()
    torch.testing.assert_close(_run(loaded, "mlp"), _run(model, "mlp"), **TOL)
