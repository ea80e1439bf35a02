"""VB-LoRA (``VBLoRAConfig``): the factor assembly against a plain loop implementation, interop with the reference
both ways (tiny Llama, BERT, GPT-2 ``Conv1D``, a custom MLP; full logits and ``save_only_topk_weights``), the bank
held once per model, merge/unmerge, savable-parameter counts and typed config errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from method_interop import (
    case_model,
    case_output,
    check_interop_both_ways,
    check_mixed_batch_rows,
    interop_case,
)
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.vblora import VBLoRALayer
from tests.models import MLP
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")

#: both libraries run the same float32 model with their own (differently ordered) matmuls: a few ulp per term of the
#: longest reductions of the tiny models (tests/numerics.py); tighter than the issue's 1e-5
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
LLAMA = "llama-causal"  # the model case (tests/models.py) of the Llama tests


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
    model = peftkit.get_peft_model(case_model(LLAMA), peftkit.VBLoRAConfig(
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
    model = peftkit.get_peft_model(case_model(LLAMA).train(), peftkit.VBLoRAConfig(
        r=2, num_vectors=8, vector_length=4, target_modules=["q_proj", "v_proj"]))
    model(input_ids=interop_case(LLAMA).make_inputs(2)["input_ids"]).logits.sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("vblora_" in n for n in trainable)
    assert model.base_model.vblora_vector_bank["default"].grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ interop


#: model case (tests/models.py) -> (target_modules, vector_length)
INTEROP_MODELS = {
    LLAMA: (["q_proj", "v_proj", "up_proj"], 4),
    "bert-feat": (["query", "value"], 8),
    "gpt2-causal": (["c_attn", "c_fc"], 8),
    "custom-mlp": (["lin0", "lin1"], 2),
}
INTEROP = [pytest.param(m, topk_only, id=f"{m}-{'topk' if topk_only else 'full'}")
           for m in INTEROP_MODELS for topk_only in (False, True) if m in (LLAMA, "gpt2-causal") or not topk_only]


def _perturb(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vblora_vector_bank" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.5)
            elif "vblora_logits" in name:
                param.add_(torch.randn(param.shape, generator=gen))


def _run(model: nn.Module, name: str) -> torch.Tensor:
    return case_output(model, interop_case(name))


def _config(lib, name: str, topk_only: bool):
    targets, length = INTEROP_MODELS[name]
    return lib.VBLoRAConfig(r=3, num_vectors=10, vector_length=length, topk=2, target_modules=targets,
                            save_only_topk_weights=topk_only, fan_in_fan_out=name == "gpt2-causal")


@pytest.mark.parametrize(("name", "topk_only"), INTEROP)
def test_interop_both_ways(name: str, topk_only: bool, tmp_path) -> None:
    """Perturbed adapters: the same saved keys (the bank once), shapes, dtypes and config essentials, and each
    library loads the other's file with the saver's outputs (1e-5); the adapter is not identity."""
    check_interop_both_ways(name, lambda lib: _config(lib, name, topk_only), tmp_path, markers=None,
                            perturb=_perturb, min_change=1e-3,
                            essentials=("r", "num_vectors", "vector_length", "topk", "save_only_topk_weights"))
    assert "base_model.vblora_vector_bank" in load_file(tmp_path / "ours" / "adapter_model.safetensors")
    if not topk_only:  # the full logits round-trip exactly
        ref = peft.PeftModel.from_pretrained(case_model(name), str(tmp_path / "ref"))
        model = peftkit.PeftModel.from_pretrained(case_model(name), str(tmp_path / "ref"))
        ours, theirs = peftkit.get_peft_model_state_dict(model), peft.get_peft_model_state_dict(ref)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_topk_only_adapter_refuses_training(tmp_path) -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, True))
    model.save_pretrained(str(tmp_path))
    loaded = peftkit.PeftModel.from_pretrained(case_model(LLAMA), str(tmp_path), is_trainable=True).train()
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        loaded(**interop_case(LLAMA).make_inputs(2))


def test_reference_topk_file_loads_without_non_finite_warning(tmp_path) -> None:
    """The reference restores the logits outside the top-k as ``-inf``, so every such load would warn that the
    checkpoint is corrupt; peftkit restores them as the lowest finite float (same outputs, no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(case_model(LLAMA), _config(peft, LLAMA, True))
    ref.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", peftkit.PeftWarning)
        model = peftkit.PeftModel.from_pretrained(case_model(LLAMA), str(tmp_path)).eval()
    assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "vblora_logits" in n)


def test_savable_parameter_counts_match_reference() -> None:
    for topk_only in (False, True):
        ours = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, topk_only))
        theirs = peft.get_peft_model(case_model(LLAMA), _config(peft, LLAMA, topk_only))
        assert ours.base_model.get_nb_savable_parameters() == theirs.base_model.get_nb_savable_parameters()


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("name", [LLAMA, "gpt2-causal"])
def test_merge_unmerge_and_unload(name: str) -> None:
    build = interop_case(name).build
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
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, False)).eval()
    model.add_adapter("other", _config(peftkit, LLAMA, False))
    _perturb(model, seed=4)
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["other", "__base__", "default"]
    check_mixed_batch_rows(model, {"input_ids": ids}, names, TOL)


@pytest.mark.parametrize("topk_only", [False, True], ids=["full", "topk"])
def test_inspect_measures_each_layer_with_the_shared_bank(topk_only: bool, tmp_path) -> None:
    from peftkit.cli.inspect_cmd import inspect_adapter

    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, topk_only)).eval()
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
    model = peftkit.get_peft_model(case_model("custom-mlp"), peftkit.VBLoRAConfig(**kwargs)).eval()
    ref = peft.get_peft_model(case_model("custom-mlp"), peft.VBLoRAConfig(**kwargs)).eval()
    assert set(peftkit.get_peft_model_state_dict(model)) == set(peft.get_peft_model_state_dict(ref))
    assert ({n for n, p in model.named_parameters() if p.requires_grad}
            == {n for n, p in ref.named_parameters() if p.requires_grad and "vblora_vector_bank" not in n}
            | {"base_model.vblora_vector_bank.default"})
    with torch.no_grad():
        model.base_model.model.lin0.base_layer.bias.add_(1.0)
    _perturb(model)
    model.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(case_model("custom-mlp"), str(tmp_path)).eval()
    torch.testing.assert_close(_run(loaded, "custom-mlp"), _run(model, "custom-mlp"), **TOL)
