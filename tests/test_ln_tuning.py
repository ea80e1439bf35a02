"""LN tuning (``LNTuningConfig``): a trained copy of each targeted norm against plain norm formulas, interop with
the reference both ways (tiny Llama, BERT, a custom MLP with a LayerNorm), merge/unmerge, several adapters, mixed
batches, typed errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from method_interop import case_model, case_output, check_interop_both_ways, interop_case, perturb_adapter
from torch import nn

import peftkit
from peftkit.errors import AdapterConflictError, ConfigError, MergeError
from peftkit.methods.ln_tuning import LNTuningLayer
from tests.models import TaskCase, mlp_inputs
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")

#: both libraries run the same modules on the same tensors, through their own wrappers: a few ulp per term of the
#: tiny models' longest reductions (tests/numerics.py), tighter than the issue's 1e-5
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)


class NormMLP(nn.Module):
    """x: (B, 10) -> (B, 2): Linear, LayerNorm, ReLU, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 16)
        self.norm = nn.LayerNorm(16)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.norm(self.lin0(x))))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return NormMLP().eval()


#: name -> (model case, target_modules (None: the default table))
MODELS = {
    "llama": (interop_case("llama-causal"), None),
    "bert": (interop_case("bert-feat"), ["LayerNorm"]),
    "mlp": (TaskCase("norm-mlp", None, _mlp, mlp_inputs, ["norm"], output_key=None), ["norm"]),
}


def _config(lib, name: str):
    targets = MODELS[name][1]
    return lib.LNTuningConfig(task_type="CAUSAL_LM") if targets is None else lib.LNTuningConfig(target_modules=targets)


def _perturb(model: nn.Module, seed: int = 3) -> None:
    perturb_adapter(model, ("ln_tuning_",), seed)


def _run(model: nn.Module, name: str) -> torch.Tensor:
    return case_output(model, MODELS[name][0])


def _llama() -> nn.Module:
    return case_model("llama-causal")


def _layers(model: nn.Module) -> dict[str, LNTuningLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LNTuningLayer)}


# ------------------------------------------------------------------------------------------------ math


def test_layer_norm_copy_matches_plain_formula() -> None:
    model = peftkit.get_peft_model(_mlp(), _config(peftkit, "mlp"))
    _perturb(model)
    layer = _layers(model)["base_model.model.norm"]
    copy = layer.ln_tuning_layers["default"]
    x = torch.randn(4, 16)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * copy.weight.detach() + copy.bias.detach()
    torch.testing.assert_close(layer(x), expected, **fp_tol(torch.float32, 16))  # 16-term mean and variance
    base = layer.get_base_layer()
    assert torch.equal(base.weight, torch.ones(16)) and torch.equal(base.bias, torch.zeros(16))  # untouched


def test_rms_norm_copy_matches_plain_formula_and_only_norms_train() -> None:
    model = peftkit.get_peft_model(_llama(), _config(peftkit, "llama"))
    _perturb(model)
    layers = _layers(model)
    assert set(layers) == {"base_model.model.model.norm"} | {
        f"base_model.model.model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".ln_tuning_layers.default." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 5 * 32  # the norms' weights, nothing else copied
    layer = layers["base_model.model.model.norm"]
    x = torch.randn(2, 3, 32)
    eps = layer.get_base_layer().variance_epsilon
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * layer.ln_tuning_layers["default"].weight
    torch.testing.assert_close(layer(x), expected.detach(), **fp_tol(torch.float32, 32))
    model.train()
    model(**MODELS["llama"][0].make_inputs(2)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_identity_at_init_and_disable_are_exact() -> None:
    expected = _run(_llama(), "llama")
    model = peftkit.get_peft_model(_llama(), _config(peftkit, "llama")).eval()
    torch.testing.assert_close(_run(model, "llama"), expected, atol=0, rtol=0)  # same weights, same kernels
    _perturb(model)
    assert not torch.allclose(_run(model, "llama"), expected, atol=1e-3)
    with model.disable_adapter():
        torch.testing.assert_close(_run(model, "llama"), expected, atol=0, rtol=0)  # the base norms, same kernels


# ------------------------------------------------------------------------------------------------ interop


@pytest.mark.parametrize("name", list(MODELS))
def test_interop_both_ways(name: str, tmp_path) -> None:
    """Perturbed norm copies: the same saved keys, shapes, dtypes and config essentials, and each library loads the
    other's file with the saver's outputs (1e-5); the adapter is not identity."""
    check_interop_both_ways(MODELS[name][0], lambda lib: _config(lib, name), tmp_path, markers=("ln_tuning_",),
                            essentials=("exclude_modules", "modules_to_save"))


# ------------------------------------------------------------------------------------------------ merging


def test_merge_unmerge_and_merge_and_unload() -> None:
    model = peftkit.get_peft_model(_llama(), _config(peftkit, "llama")).eval()
    _perturb(model)
    base_weights = {n: m.get_base_layer().weight.detach().clone() for n, m in _layers(model).items()}
    expected = _run(model, "llama")
    model.merge_adapter()
    torch.testing.assert_close(_run(model, "llama"), expected, atol=0, rtol=0)  # the copy's values, same kernels
    for name, layer in _layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, layer.ln_tuning_layers["default"].weight)
    model.unmerge_adapter()
    for name, layer in _layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, base_weights[name])
    torch.testing.assert_close(_run(model, "llama"), expected, atol=0, rtol=0)  # merge copies values: same kernels
    merged = model.merge_and_unload()
    assert not _layers(merged) and not any("ln_tuning" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_run(merged, "llama"), expected, atol=0, rtol=0)  # copied values, same kernels


def test_save_while_merged_writes_the_trained_copy(tmp_path) -> None:
    """Reference trap: its merge swaps the base module and the copy, so a save after merging writes the untrained
    base norm under the adapter's key. peftkit writes the trained copy either way."""
    model = peftkit.get_peft_model(_mlp(), _config(peftkit, "mlp")).eval()
    _perturb(model)
    trained = dict(peftkit.get_peft_model_state_dict(model))
    model.merge_adapter()
    merged_state = peftkit.get_peft_model_state_dict(model)
    assert all(torch.equal(merged_state[k], v) for k, v in trained.items())
    ref = peft.get_peft_model(_mlp(), _config(peft, "mlp")).eval()
    _perturb(ref)  # the same values as peftkit's copy
    ref.merge_adapter()
    assert torch.equal(peft.get_peft_model_state_dict(ref)["base_model.model.norm.ln_tuning_layers.weight"],
                       torch.ones(16))  # the reference now holds the base norm there


def test_adapter_added_while_merged_starts_from_the_base_norm() -> None:
    """Reference trap: its new adapter copies ``base_layer``, which after a merge is the merged adapter's copy."""
    model = peftkit.get_peft_model(_mlp(), _config(peftkit, "mlp")).eval()
    _perturb(model)
    model.merge_adapter()
    model.add_adapter("other", _config(peftkit, "mlp"))
    layer = _layers(model)["base_model.model.norm"]
    assert torch.equal(layer.ln_tuning_layers["other"].weight, torch.ones(16))
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, torch.ones(16))


def test_merging_two_adapters_at_once_and_two_active_adapters_raise() -> None:
    model = peftkit.get_peft_model(_mlp(), _config(peftkit, "mlp")).eval()
    model.add_adapter("other", _config(peftkit, "mlp"))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(AdapterConflictError, match="one adapter at a time") as info:
        _run(model, "mlp")
    assert isinstance(info.value, ValueError)  # the reference raises ValueError
    with pytest.raises(MergeError, match="more than one adapter"):
        model.merge_adapter()
    assert not any(layer.merged for layer in _layers(model).values())


def test_set_adapter_delete_and_mixed_batch() -> None:
    model = peftkit.get_peft_model(_mlp(), _config(peftkit, "mlp")).eval()
    _perturb(model, seed=3)
    model.add_adapter("other", _config(peftkit, "mlp"))
    _perturb(model, seed=4)  # perturbs both; "other" now differs from "default"
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    outs = {}
    with torch.no_grad():
        for name in ("default", "other"):
            model.set_adapter(name)
            outs[name] = model(x)
        with model.disable_adapter():
            outs["__base__"] = model(x)
        names = ["other", "__base__", "default"]
        mixed = model(x, adapter_names=names)
    assert not torch.allclose(outs["default"], outs["other"])
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], outs[name][row], **fp_tol(torch.float32, 16))
    model.delete_adapter("other")
    assert list(_layers(model)["base_model.model.norm"].ln_tuning_layers) == ["default"]


# ------------------------------------------------------------------------------------------------ errors


def test_bad_target_types_and_unknown_model_type_raise_typed_errors() -> None:
    with pytest.raises(ConfigError, match="target_modules"):
        peftkit.LNTuningConfig(target_modules=3)
    with pytest.raises(ConfigError, match="exclude_modules"):
        peftkit.LNTuningConfig(exclude_modules=[1])
    with pytest.raises(ValueError, match="target_modules"):  # a plain model has no default table entry
        peftkit.get_peft_model(_mlp(), peftkit.LNTuningConfig())
