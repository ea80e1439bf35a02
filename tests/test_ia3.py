"""(IA)³: layer math against a dense reference, merging, defaults, config rules, weighted combination, mixed batches,
and interoperability with the reference library (files load both ways with the same outputs)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import causal_lm_inputs, seq2seq_inputs, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from numerics import TINY_MODEL_REDUCTION, fp_tol
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import ConfigError, IA3Config, get_peft_model
from peftkit.methods.ia3 import IA3Layer

ATOL = 1e-5
# Logits of two models (another instance, library, path or merge) run other kernels on other buffers: float32
# over the tiny models' reductions (see tests/numerics.py)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)


def _randomize(model: nn.Module, seed: int) -> None:
    """Give every ``ia3_l`` vector random values around 1 so that the adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "ia3_l" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=gen))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.Linear(6, 5)
        self.ff = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(torch.relu(self.attn(x)))


def _mlp_peft(**kwargs: Any) -> Any:
    config = IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"], **kwargs)
    model = get_peft_model(_MLP(), config)
    _randomize(model, 1)
    return model.eval()


# ---------------------------------------------------------------------------------------------- math
def test_layer_math_matches_dense_formula() -> None:
    """Attention module: ``y = (x Wᵀ + b) ⊙ l`` with ``l: (out, 1)``; feedforward: ``y = (x ⊙ l) Wᵀ + b`` with
    ``l: (1, in)`` (computed from the saved tensors)."""
    model = _mlp_peft()
    state = peftkit.get_peft_model_state_dict(model)
    l_attn, l_ff = state["base_model.model.attn.ia3_l"], state["base_model.model.ff.ia3_l"]
    assert l_attn.shape == (5, 1) and l_ff.shape == (1, 5)
    base = _MLP()
    x = torch.randn(3, 6)
    h = (x @ base.attn.weight.T + base.attn.bias) * l_attn.flatten()
    expected = (torch.relu(h) * l_ff.flatten()) @ base.ff.weight.T + base.ff.bias
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)


def test_two_active_adapters_multiply() -> None:
    """With two active adapters a layer scales by the product of their vectors."""
    model = _mlp_peft()
    model.add_adapter("b", IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"]))
    _randomize(model, 2)
    layer = model.base_model.model.attn
    la, lb = layer.ia3_l["default"].detach().flatten(), layer.ia3_l["b"].detach().flatten()
    model.base_model.set_adapter(["default", "b"])
    x = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) * la * lb, **TOL)


@pytest.mark.parametrize("kind", ["linear", "gpt2", "conv2d"])
def test_merge_equivalence_and_unmerge(kind: str) -> None:
    """Merged outputs equal unmerged ones (1e-5); unmerging restores the base weights (1e-5) without a warning for
    vectors away from 0; merge_and_unload gives plain modules with the same outputs."""
    if kind == "linear":
        model, inputs = _mlp_peft(), {"x": torch.randn(3, 6)}
    elif kind == "gpt2":
        config = IA3Config(task_type="CAUSAL_LM")  # defaults: c_attn + mlp.c_proj (feedforward)
        model, inputs = get_peft_model(tiny_gpt2(), config), causal_lm_inputs(2)
        _randomize(model, 3)
        model.eval()
    else:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3, groups=2))
        config = IA3Config(target_modules=["0", "2"], feedforward_modules=["2"])
        model, inputs = get_peft_model(net, config), {"input": torch.randn(2, 3, 8, 8)}
        _randomize(model, 3)
        model.eval()

    def out() -> torch.Tensor:
        with torch.no_grad():
            result = model(**inputs)
        return result.logits if hasattr(result, "logits") else result

    before_w = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = out()
    model.merge_adapter()
    torch.testing.assert_close(out(), unmerged, rtol=1e-5, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in before_w:
            torch.testing.assert_close(p.detach(), before_w[n], rtol=1e-5, atol=ATOL)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, IA3Layer) for m in merged.modules())
    with torch.no_grad():
        result = merged(**inputs)
    torch.testing.assert_close(result.logits if hasattr(result, "logits") else result, unmerged, rtol=1e-5, atol=ATOL)


def test_unmerge_warns_for_vectors_near_zero() -> None:
    model = _mlp_peft()
    with torch.no_grad():
        model.base_model.model.attn.ia3_l["default"][0] = 0.0
    model.merge_adapter()
    with pytest.warns(peftkit.PeftWarning, match="inaccurate"):
        model.unmerge_adapter()


def test_gpt2_conv1d_detected_without_touching_user_config() -> None:
    """GPT-2 ``Conv1D`` is detected per layer (``fan_in_fan_out``); the user's config object stays unchanged."""
    config = IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"],
                       feedforward_modules=["mlp.c_proj"])
    model = get_peft_model(tiny_gpt2(), config)
    assert config.fan_in_fan_out is False
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.ia3_l["default"].shape == (layer.out_features, 1)
    assert model.base_model.model.transformer.h[0].mlp.c_proj.ia3_l["default"].shape[0] == 1


def test_init_false_is_random_and_changes_outputs() -> None:
    model = get_peft_model(_MLP(), IA3Config(target_modules=["attn"], init_ia3_weights=False))
    vec = model.base_model.model.attn.ia3_l["default"]
    assert not torch.allclose(vec, torch.ones_like(vec))


# ---------------------------------------------------------------------------------------------- config
def test_feedforward_must_be_subset_of_targets() -> None:
    with pytest.raises(ConfigError, match="feedforward_modules"):
        IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"])
    IA3Config(target_modules=["k", "wo"], feedforward_modules=["wo"])
    IA3Config(target_modules=".*k", feedforward_modules=["wo"])  # regex targets: not checked, like the reference


@pytest.mark.parametrize("build, model_type", [
    (lambda: tiny_llama("CAUSAL_LM"), "llama"), (tiny_t5, "t5"), (tiny_gpt2, "gpt2"), (lambda: tiny_bert(None), "bert"),
])
def test_default_targets_match_reference(build: Any, model_type: str) -> None:
    """Default target/feedforward modules and the wrapped module names equal the reference's."""
    peft = pytest.importorskip("peft")
    ours = get_peft_model(build(), IA3Config())
    theirs = peft.get_peft_model(build(), peft.IA3Config())
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules)
    assert set(ours.peft_config["default"].feedforward_modules) == set(
        theirs.peft_config["default"].feedforward_modules)
    ours_keys = {k: v.shape for k, v in peftkit.get_peft_model_state_dict(ours).items()}
    theirs_keys = {k: v.shape for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert ours_keys == theirs_keys


def test_unknown_model_type_without_feedforward_has_none() -> None:
    model = get_peft_model(_MLP(), IA3Config(target_modules=["attn", "ff"]))
    assert model.peft_config["default"].feedforward_modules == set()
    assert not model.base_model.model.ff.is_feedforward


# ---------------------------------------------------------------------------------------------- combination
def test_add_weighted_adapter_matches_reference() -> None:
    """``add_weighted_adapter`` gives ``Σ w_i l_i`` per layer, the same vectors and outputs as the reference."""
    peft = pytest.importorskip("peft")
    targets = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    ours = get_peft_model(tiny_llama("CAUSAL_LM"), IA3Config(task_type="CAUSAL_LM", **targets), adapter_name="one")
    ours.add_adapter("two", IA3Config(task_type="CAUSAL_LM", **targets))
    _randomize(ours, 5)
    theirs = peft.get_peft_model(tiny_llama("CAUSAL_LM"), peft.IA3Config(task_type="CAUSAL_LM", **targets),
                                 adapter_name="one")
    theirs.add_adapter("two", peft.IA3Config(task_type="CAUSAL_LM", **targets))
    theirs.load_state_dict(ours.state_dict(), strict=False)
    ours.add_weighted_adapter(["one", "two"], [0.7, -0.4], "n")
    theirs.add_weighted_adapter(["one", "two"], [0.7, -0.4], "n")
    ours_sd = peftkit.get_peft_model_state_dict(ours, adapter_name="n")
    theirs_sd = peft.get_peft_model_state_dict(theirs, adapter_name="n")
    assert ours_sd.keys() == theirs_sd.keys()
    for key, value in ours_sd.items():
        torch.testing.assert_close(value, theirs_sd[key], rtol=0, atol=1e-6)
    la = ours.base_model.model.model.layers[0].self_attn.k_proj.ia3_l
    torch.testing.assert_close(la["n"], 0.7 * la["one"] - 0.4 * la["two"], rtol=0, atol=1e-6)
    assert set(ours.peft_config["n"].feedforward_modules) == {"down_proj"}


# ---------------------------------------------------------------------------------------------- mixed batches
def test_mixed_batch_rows_follow_their_adapter() -> None:
    model = _mlp_peft()
    model.add_adapter("b", IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"]))
    _randomize(model, 7)
    x = torch.randn(3, 6)
    with torch.no_grad():
        mixed = model(x=x, adapter_names=["b", "__base__", "default"])
        model.set_adapter("b")
        out_b = model(x=x)
        model.set_adapter("default")
        out_a = model(x=x)
        with model.disable_adapter():
            out_base = model(x=x)
    torch.testing.assert_close(mixed, torch.stack([out_b[0], out_base[1], out_a[2]]), **TOL)


# ---------------------------------------------------------------------------------------------- interop
def _interop_case(model: str) -> tuple[Any, str, dict[str, torch.Tensor]]:
    if model == "llama":
        return (lambda: tiny_llama("CAUSAL_LM")), "CAUSAL_LM", causal_lm_inputs(2)
    return tiny_t5, "SEQ_2_SEQ_LM", seq2seq_inputs(2)


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.interop
@pytest.mark.parametrize("direction", ["ours-to-reference", "reference-to-ours"])
@pytest.mark.parametrize("model_name", ["llama", "t5"])
def test_interop_with_reference(model_name: str, direction: str, tmp_path: Path) -> None:
    """A file saved by one library loads in the other: same keys and shapes, same config essentials (incl.
    feedforward_modules), outputs within 1e-5."""
    peft = pytest.importorskip("peft")
    build, task, inputs = _interop_case(model_name)
    lib_save, lib_load = (peftkit, peft) if direction == "ours-to-reference" else (peft, peftkit)
    saver = lib_save.get_peft_model(build(), lib_save.IA3Config(task_type=task))
    _randomize(saver, 11)
    saver.eval()
    expected = _logits(saver, inputs)
    saver.save_pretrained(tmp_path)
    loaded = lib_load.PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, inputs), expected, **TOL)
    with torch.no_grad():
        assert (_logits(build().eval(), inputs) - expected).abs().max() > 1e-3  # the vectors matter
    saved = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    reloaded = {k: v.shape for k, v in lib_load.get_peft_model_state_dict(loaded).items()}
    assert saved == reloaded
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    loaded_config = loaded.peft_config["default"]
    assert set(loaded_config.target_modules) == set(config["target_modules"])
    assert set(loaded_config.feedforward_modules) == set(config["feedforward_modules"])
    expected_ff = {"llama": {"down_proj"}, "t5": {"wo"}}[model_name]
    assert set(config["feedforward_modules"]) == expected_ff
    assert config["init_ia3_weights"] is True and config["fan_in_fan_out"] is False
