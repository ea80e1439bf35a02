"""``add_weighted_adapter``: the eleven LoRA combination types, their rank rules, the exact ``cat`` identity in every
scaling mode (the reference's rsLoRA overscale is not reproduced), agreement with the reference library (same seed,
same numbers), save/reload in both libraries, the pure merge helpers, and the errors.

The model has one layer of each kind LoRA wraps: an embedding, a linear layer, a conv (3x1 kernel) and a GPT-2
``Conv1D`` (weights stored ``(in, out)``); ``head`` is used as a ``modules_to_save`` module.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import pytest
import torch
from numerics import fp_tol
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.errors import AdapterExistsError, AdapterNotFoundError, ConfigError, MergeError
from peftkit.methods.lora.combine import COMBINATIONS
from peftkit.ops.merge import (
    RECIPES,
    merge_tensors,
    prune_magnitude,
    prune_random,
    quantile,
    truncated_svd_factors,
)

ALL_TYPES = list(COMBINATIONS)
SVD_TYPES = [t for t in ALL_TYPES if t.endswith("svd")]
TARGETS = ["emb", "lin0", "conv", "proj"]
# float32 results of the same math by other kernels or orders. A delta weight (one layer, ``B @ A`` summed over the
# sources) against another route to it: at most 2 sources of rank <= 8 per element. A model output (the reference
# vs peftkit, a reloaded model) or a delta through an SVD: the longest path of Net (12 + 3 * 8 + 6 + 5 features,
# plus a rank <= 16 update in each of the 4 layers)
DELTA_TOL = fp_tol(torch.float32, 2 * 8)
TOL = fp_tol(torch.float32, 12 + 3 * 8 + 6 + 5 + 4 * 16)
ATOL = TOL["atol"]


class Net(nn.Module):
    """x: (B, L) long in [0, 20) -> (B, L, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin0 = nn.Linear(12, 8)
        self.conv = nn.Conv2d(8, 6, (3, 1), padding=(1, 0))
        self.proj = Conv1D(5, 6)  # 6 -> 5, weight (6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin0(self.emb(x))  # (B, L, 8)
        h = self.conv(h.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2).contiguous()  # (B, L, 6)
        return self.head(torch.relu(self.proj(h)))


def _base() -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net()


INPUTS = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))


def _build(lib: Any, specs: dict[str, dict[str, Any]], seed: int = 1) -> Any:
    """A model holding one non-trivial LoRA adapter per entry of ``specs`` (``name -> LoraConfig kwargs``); the
    first is active. ``target_modules`` defaults to every wrapped layer."""
    torch.manual_seed(seed)
    model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kwargs in specs.items():
            config = lib.LoraConfig(**{"target_modules": TARGETS, "init_lora_weights": False, **kwargs})
            if model is None:
                model = lib.get_peft_model(_base(), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
    return model


def _layers(model: Any, adapter: str) -> dict[str, nn.Module]:
    """``{module name: lora layer}`` of the layers holding ``adapter`` (works for both libraries)."""
    return {n: m for n, m in model.named_modules()
            if adapter in getattr(m, "lora_A", {}) or adapter in getattr(m, "lora_embedding_A", {})}


def _deltas(model: Any, adapter: str) -> dict[str, torch.Tensor]:
    return {n: m.get_delta_weight(adapter).detach() for n, m in _layers(model, adapter).items()}


def _factors(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]


def _combine(model: Any, adapters: list[str], weights: list[float], name: str = "n", **kwargs: Any) -> None:
    model.add_weighted_adapter(adapters, weights, name, **kwargs)


EQUAL = {"a": {"r": 4, "lora_alpha": 8}, "b": {"r": 4, "lora_alpha": 16}}
WEIGHTS = [0.7, -0.4]


# ---------------------------------------------------------------------------------------------- rank rules
@pytest.mark.parametrize("combination_type", ALL_TYPES)
def test_new_rank_config_and_shapes(combination_type: str) -> None:
    specs = {"a": {"r": 4, "lora_alpha": 8}, "b": {"r": 4, "lora_alpha": 16, "use_rslora": True}}
    model = _build(peftkit, specs)
    _combine(model, ["a", "b"], WEIGHTS, combination_type=combination_type, density=0.5)
    rank = 8 if combination_type == "cat" else 4
    config = model.peft_config["n"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (rank, rank, False)
    assert config.rank_pattern == {} and config.alpha_pattern == {}
    layers = _layers(model, "n")
    assert sorted(layers) == sorted(f"base_model.model.{t}" for t in TARGETS)
    for layer in layers.values():
        A, B = _factors(layer, "n")
        assert A.shape[0] == rank and B.shape[1] == rank
        assert layer.r["n"] == rank and float(layer.scaling["n"]) == 1.0
        assert not A.requires_grad and not B.requires_grad  # added inactive and frozen
        assert B.abs().sum() > 0
    assert model.active_adapters == ["a"]
    if combination_type in SVD_TYPES:
        _combine(model, ["a", "b"], WEIGHTS, "n3", combination_type=combination_type, density=0.5, svd_rank=3)
        assert model.peft_config["n3"].r == 3
        assert all(_factors(m, "n3")[0].shape[0] == 3 for m in _layers(model, "n3").values())


def test_ranks_that_differ() -> None:
    specs = {"a": {"r": 4, "lora_alpha": 8}, "c": {"r": 2, "lora_alpha": 2, "rank_pattern": {"lin0": 3}}}
    model = _build(peftkit, specs)
    _combine(model, ["a", "c"], [1.0, 1.0], "cat", combination_type="cat")
    _combine(model, ["a", "c"], [1.0, 1.0], "svd", combination_type="svd")
    _combine(model, ["a", "c"], [1.0, 1.0], "svd2", combination_type="svd", svd_rank=2)
    assert [model.peft_config[n].r for n in ("cat", "svd", "svd2")] == [4 + 3, 4, 2]
    with pytest.raises(ConfigError, match=r"combination_type='linear'.*'a': 4, 'c': 3"):
        _combine(model, ["a", "c"], [1.0, 1.0], combination_type="linear")


# ---------------------------------------------------------------------------------------------- exactness
CAT_CASES = {
    "plain": {"a": {"r": 4, "lora_alpha": 8}, "b": {"r": 2, "lora_alpha": 4}},
    "rslora": {"a": {"r": 4, "lora_alpha": 8, "use_rslora": True}, "b": {"r": 2, "lora_alpha": 16, "use_rslora": True}},
    "patterns": {
        "a": {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"lin0": 2}, "alpha_pattern": {"conv": 3}},
        "b": {"r": 2, "lora_alpha": 4, "target_modules": ["lin0", "proj"]},
        "c": {"r": 3, "lora_alpha": 5, "rank_pattern": {"proj": 1}, "target_modules": ["emb", "proj"]},
    },
}


@pytest.mark.parametrize("case", list(CAT_CASES))
def test_cat_reproduces_the_weighted_sum_exactly(case: str) -> None:
    """``ΔW_new == sum_i w_i ΔW_i`` in every layer, whatever each source's scaling (rsLoRA, patterns); the
    reference's result is ``sqrt(r_new)`` times this with rsLoRA sources."""
    specs = CAT_CASES[case]
    model = _build(peftkit, specs)
    names, weights = list(specs), [0.7, -0.4, 1.3][: len(specs)]
    _combine(model, names, weights, combination_type="cat")
    deltas = _deltas(model, "n")
    assert sorted(deltas) == sorted(f"base_model.model.{t}" for t in TARGETS)
    for layer, delta in deltas.items():
        module = model.get_submodule(layer)
        parts = [w * module.get_delta_weight(a) for a, w in zip(names, weights) if a in module.r]
        torch.testing.assert_close(delta, torch.stack(parts).sum(dim=0).detach(), **DELTA_TOL)
    assert model.peft_config["n"].r == sum(max([s["r"], *s.get("rank_pattern", {}).values()]) for s in specs.values())


def test_svd_with_enough_rank_is_exact() -> None:
    specs = {"a": {"r": 2, "lora_alpha": 8, "use_rslora": True}, "b": {"r": 2, "lora_alpha": 4}}
    model = _build(peftkit, specs)
    _combine(model, ["a", "b"], WEIGHTS, combination_type="svd", svd_rank=4)
    for layer, delta in _deltas(model, "n").items():
        module = model.get_submodule(layer)
        expected = WEIGHTS[0] * module.get_delta_weight("a") + WEIGHTS[1] * module.get_delta_weight("b")
        torch.testing.assert_close(delta, expected.detach(), rtol=1e-4, atol=1e-5)


def test_linear_combines_factors_and_pads_smaller_ranks() -> None:
    """``linear``: ``A_new = sum sign(c_i) sqrt|c_i| A_i``, ``B_new = sum sqrt|c_i| B_i`` with ``c_i = w_i scaling_i``;
    a layer where a source has a smaller rank (``rank_pattern``) is zero-padded."""
    specs = {"a": {"r": 4, "lora_alpha": 8, "rank_pattern": {"proj": 2}}, "b": {"r": 4, "lora_alpha": 16}}
    model = _build(peftkit, specs)
    _combine(model, ["a", "b"], WEIGHTS, combination_type="linear")
    for layer in _layers(model, "n").values():
        A_new, B_new = _factors(layer, "n")
        A_sum, B_sum = torch.zeros_like(A_new), torch.zeros_like(B_new)
        for adapter, weight in zip("ab", WEIGHTS):
            A, B = _factors(layer, adapter)
            c = weight * layer.scaling[adapter]
            A_sum[: A.shape[0]] += math.copysign(math.sqrt(abs(c)), c) * A.detach()
            B_sum[:, : B.shape[1]] += math.sqrt(abs(c)) * B.detach()
        torch.testing.assert_close(A_new, A_sum, **DELTA_TOL)
        torch.testing.assert_close(B_new, B_sum, **DELTA_TOL)
    assert _layers(model, "a")["base_model.model.proj"].r["a"] == 2


def test_single_adapter_is_scaled_linearly() -> None:
    model = _build(peftkit, {"a": {"r": 4, "lora_alpha": 8, "use_rslora": True}})
    model.add_weighted_adapter(["a"], [2.0], "n", combination_type="svd")  # through PeftModel.__getattr__
    assert model.peft_config["n"].r == 4
    for layer, delta in _deltas(model, "n").items():
        torch.testing.assert_close(delta, 2.0 * model.get_submodule(layer).get_delta_weight("a").detach(),
                                   **DELTA_TOL)


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties_svd"])
def test_dare_is_reproducible_with_a_seed(combination_type: str) -> None:
    model = _build(peftkit, EQUAL)
    for name, seed in (("n1", 7), ("n2", 7), ("n3", 8)):
        torch.manual_seed(seed)
        _combine(model, ["a", "b"], WEIGHTS, name, combination_type=combination_type, density=0.5)
    first, again, other = (_deltas(model, n) for n in ("n1", "n2", "n3"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.allclose(first[k], other[k]) for k in first)


# ---------------------------------------------------------------------------------------------- targets, modules_to_save
@pytest.mark.parametrize("form", ["sets", "regexes", "mixed"])
def test_new_adapter_targets_the_union(form: str) -> None:
    targets = {"sets": (["lin0", "conv"], ["proj"]), "regexes": ("lin0|conv", "proj"),
               "mixed": (["lin0", "conv"], "proj")}[form]
    specs = {"a": {"r": 2, "target_modules": targets[0]}, "b": {"r": 2, "target_modules": targets[1]}}
    model = _build(peftkit, specs)
    _combine(model, ["a", "b"], [1.0, 1.0], combination_type="cat")
    assert sorted(_layers(model, "n")) == [f"base_model.model.{t}" for t in ("conv", "lin0", "proj")]
    expected = {"sets": {"lin0", "conv", "proj"}, "regexes": "(lin0|conv)|(proj)", "mixed": "lin0|conv|proj"}[form]
    assert model.peft_config["n"].target_modules == expected


def test_modules_to_save_copy_comes_from_the_source() -> None:
    specs = {"a": {"r": 2, "modules_to_save": ["head"]}, "b": {"r": 2}}
    model = _build(peftkit, specs)
    wrapper = model.base_model.model.head
    with torch.no_grad():
        wrapper.modules_to_save["a"].weight.add_(1.0)
    _combine(model, ["a", "b"], [0.5, 0.5], combination_type="cat")
    assert model.peft_config["n"].modules_to_save == ["head"]
    assert torch.equal(wrapper.modules_to_save["n"].weight, wrapper.modules_to_save["a"].weight)
    assert not wrapper.modules_to_save["n"].weight.requires_grad


def test_shared_modules_to_save_raises_and_changes_nothing() -> None:
    specs = {"a": {"r": 2, "modules_to_save": ["head"]}, "b": {"r": 2, "modules_to_save": ["head"]}}
    model = _build(peftkit, specs)
    with pytest.raises(MergeError, match=r"\['a', 'b'\].*'head'"):
        _combine(model, ["a", "b"], [1.0, 1.0], combination_type="cat")
    assert list(model.peft_config) == ["a", "b"] and not _layers(model, "n")


# ---------------------------------------------------------------------------------------------- the reference
def _reference_combine(model: Any, seed: int, *args: Any, **kwargs: Any) -> None:
    """Run the reference's add_weighted_adapter with the RNG seeded right after its injection of the new adapter
    (peftkit computes before injecting, so ``torch.manual_seed(seed)`` before its call is the same state)."""
    cls = type(model.base_model)
    original = cls.inject_adapter

    def inject_then_seed(self: Any, *a: Any, **kw: Any) -> Any:
        result = original(self, *a, **kw)
        torch.manual_seed(seed)
        return result

    cls.inject_adapter = inject_then_seed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(*args, **kwargs)
    finally:
        cls.inject_adapter = original


def _copy_adapters(source: Any, target: Any) -> None:
    """Copy every LoRA tensor of ``source`` (peftkit) into ``target`` (the reference) by state-dict key."""
    ours = source.state_dict()
    theirs = {k: v for k, v in target.state_dict().items() if "lora_" in k}
    assert theirs and set(theirs) <= set(ours)
    with torch.no_grad():
        for key, tensor in theirs.items():
            tensor.copy_(ours[key])


@pytest.mark.interop
@pytest.mark.parametrize("combination_type", ALL_TYPES)
def test_same_numbers_as_the_reference(combination_type: str) -> None:
    peft = pytest.importorskip("peft")
    ours, theirs = _build(peftkit, EQUAL), _build(peft, EQUAL)
    _copy_adapters(ours, theirs)
    torch.manual_seed(3)
    _combine(ours, ["a", "b"], WEIGHTS, combination_type=combination_type, density=0.5)
    _reference_combine(theirs, 3, ["a", "b"], WEIGHTS, "n", combination_type=combination_type, density=0.5)
    mine, ref = _deltas(ours, "n"), _deltas(theirs, "n")
    assert sorted(mine) == sorted(ref)
    for layer in mine:
        torch.testing.assert_close(mine[layer], ref[layer], **TOL)
    assert (ours.peft_config["n"].r, ours.peft_config["n"].lora_alpha) == (theirs.peft_config["n"].r,
                                                                          theirs.peft_config["n"].lora_alpha)


@pytest.mark.interop
def test_reference_overscales_cat_with_rslora() -> None:
    """The trap peftkit avoids: with rsLoRA sources the reference's ``cat`` is ``sqrt(r_new)`` times the sum."""
    peft = pytest.importorskip("peft")
    specs = CAT_CASES["rslora"]
    ours, theirs = _build(peftkit, specs), _build(peft, specs)
    _copy_adapters(ours, theirs)
    _combine(ours, ["a", "b"], WEIGHTS, combination_type="cat")
    _reference_combine(theirs, 0, ["a", "b"], WEIGHTS, "n", combination_type="cat")
    mine, ref = _deltas(ours, "n"), _deltas(theirs, "n")
    for layer in mine:
        torch.testing.assert_close(ref[layer], math.sqrt(6) * mine[layer], **DELTA_TOL)


@pytest.mark.interop
@pytest.mark.parametrize("combination_type", ["cat", "ties_svd", "dare_linear"])
def test_combined_adapter_saves_and_reloads_in_both_libraries(combination_type: str, tmp_path: Any) -> None:
    peft = pytest.importorskip("peft")
    model = _build(peftkit, CAT_CASES["rslora"] if combination_type == "cat" else EQUAL)
    _combine(model, ["a", "b"], WEIGHTS, combination_type=combination_type, density=0.5)
    model.set_adapter("n")
    model.eval()
    with torch.no_grad():
        expected = model(INPUTS)
        model.base_model.set_adapter("a")
        assert (model(INPUTS) - expected).abs().max() > 1e-3  # the combined adapter is observable
    model.save_pretrained(tmp_path, selected_adapters=["n"])
    reloaded = peftkit.PeftModel.from_pretrained(_base(), tmp_path / "n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(_base(), tmp_path / "n")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(INPUTS), expected, **TOL)
        torch.testing.assert_close(reference(INPUTS), expected, **TOL)


# ---------------------------------------------------------------------------------------------- errors
ERROR_CASES = {
    "unknown adapter": ({"adapters": ["a", "zz"]}, AdapterNotFoundError, "'zz'"),
    "name taken": ({"adapter_name": "b"}, AdapterExistsError, "'b' already exists"),
    "no adapters": ({"adapters": [], "weights": []}, ConfigError, "adapters"),
    "weights length": ({"weights": [1.0]}, ConfigError, r"weights=\[1.0\].*2 for \['a', 'b'\]"),
    "rank mismatch": ({"adapters": ["a", "c"], "combination_type": "ties", "density": 0.5}, ConfigError,
                      r"'a': 4, 'c': 2"),
    "unknown type": ({"combination_type": "mean"}, ConfigError, "'mean'.*dare_linear_svd"),
    "density missing": ({"combination_type": "ties"}, ConfigError, "density=None"),
    "density zero": ({"combination_type": "dare_linear", "density": 0.0}, ConfigError, "density=0.0"),
    "density above 1": ({"combination_type": "magnitude_prune_svd", "density": 1.5}, ConfigError, "density=1.5"),
    "sign method": ({"majority_sign_method": "mean"}, ConfigError, "'mean'.*frequency"),
    "svd_rank": ({"svd_rank": 0}, ConfigError, "svd_rank=0"),
    "svd_clamp": ({"svd_clamp": 2.0}, ConfigError, "svd_clamp=2.0"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_leave_the_model_unchanged(case: str) -> None:
    changes, error, message = ERROR_CASES[case]
    model = _build(peftkit, {**EQUAL, "c": {"r": 2}})
    kwargs = {"adapters": ["a", "b"], "weights": WEIGHTS, "adapter_name": "n", **changes}
    with pytest.raises(error, match=message):
        model.add_weighted_adapter(**kwargs)
    assert list(model.peft_config) == ["a", "b", "c"] and not _layers(model, "n")


def test_sources_of_different_peft_types_raise() -> None:
    model = _build(peftkit, EQUAL)
    model.peft_config["x"] = peftkit.PeftConfig(peft_type="IA3")  # no public way: two types never coexist
    with pytest.raises(ConfigError, match="different peft types.*'x': 'IA3'"):
        model.add_weighted_adapter(["a", "x"], [1.0, 1.0], "n")


def test_method_without_combination_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    from peftkit import tuner

    model = _build(peftkit, EQUAL)
    spec = dataclasses.replace(tuner.get_method("LORA"), combine=None)
    monkeypatch.setattr(tuner, "get_method", lambda peft_type: spec)
    with pytest.raises(ConfigError, match="add_weighted_adapter supports"):
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "n")


# ---------------------------------------------------------------------------------------------- the pure helpers
def test_dare_keeps_about_density_and_rescales() -> None:
    torch.manual_seed(0)
    pruned = prune_random(torch.ones(20_000), 0.3)
    kept = pruned[pruned != 0]
    assert abs(kept.numel() / 20_000 - 0.3) < 0.015
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.3))


def test_ties_elects_signs_and_averages_the_agreeing_entries() -> None:
    t1, t2 = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([2.0, 1.0, -1.0, 0.0])
    ones = torch.ones(2)
    total = merge_tensors([t1, t2], ones, RECIPES["ties"], density=1.0, majority_sign_method="total")
    frequency = merge_tensors([t1, t2], ones, RECIPES["ties"], density=1.0, majority_sign_method="frequency")
    assert total.tolist() == [1.5, -2.0, 3.0, 0.0]  # sums 3, -1, 2: the disagreeing entry is dropped
    assert frequency.tolist() == [1.5, 1.0, 3.0, 0.0]  # sign counts tie at 0 -> '+' is elected
    weighted = merge_tensors([t1, t2], torch.tensor([2.0, 1.0]), RECIPES["linear"])
    assert weighted.tolist() == [4.0, -3.0, 5.0, 0.0]


def test_magnitude_prune_keeps_the_largest_entries() -> None:
    assert prune_magnitude(torch.tensor([1.0, -4.0, 2.0, -3.0]), 0.5).tolist() == [0.0, -4.0, 0.0, -3.0]
    t = torch.randn(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prune_magnitude(t, 1.0), t)


def test_quantile_matches_torch() -> None:
    values = torch.randn(101, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.3, 0.5, 0.99, 1.0):
        torch.testing.assert_close(quantile(values, q), torch.quantile(values, q))


def test_truncated_svd_factors() -> None:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 2, generator=gen) @ torch.randn(2, 5, generator=gen)  # rank 2, (6, 5)
    B, A = truncated_svd_factors(delta, 3)
    assert (B.shape, A.shape) == ((6, 3), (3, 5))
    torch.testing.assert_close(B @ A, delta, rtol=1e-5, atol=1e-5)
    B, A = truncated_svd_factors(delta, 7, full_matrices=False)  # above min(6, 5): zero-padded
    assert (B.shape, A.shape) == ((6, 7), (7, 5)) and B[:, 5:].abs().sum() == 0 and A[5:].abs().sum() == 0
    torch.testing.assert_close(B @ A, delta, rtol=1e-5, atol=1e-5)
    B, A = truncated_svd_factors(delta, 2, clamp=0.9)
    limit = quantile(torch.cat([f.reshape(-1) for f in truncated_svd_factors(delta, 2)]), 0.9)
    assert B.abs().max() <= limit + 1e-6 and A.abs().max() <= limit + 1e-6
