"""MiSS (formerly Bone): the three variants against dense weights written here, identity at init, merging, adapters
of different variants on one layer, mixed batches, dropout, config and per-layer errors, gradients, and interop both
ways with the reference (tiny Llama, BERT, an MLP).

The generic properties (identity, merge, save/load, multi-adapter, errors) come from the conformance suite.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from method_interop import check_interop_both_ways, interop_case, quantized_linear
from numerics import fp_tol
from torch import nn

from peftkit import MissConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.miss import MissLayer

ATOL = 1e-5  # issue 21: interop outputs within 1e-5


# ------------------------------------------------------------------------------------------------ plain math
def plain_weight(w: torch.Tensor, block: torch.Tensor, init_weights: Any, mini_r: int = 1) -> torch.Tensor:
    """``W + ΔW`` of one MiSS adapter by the paper's definitions, element by element (float64)."""
    w, block = w.detach().double(), block.detach().double()
    out, n_in = w.shape
    new = w.clone()
    if init_weights == "bat":
        r = block.shape[-1]
        eye = torch.eye(r, dtype=torch.float64)
        for i in range(out // r):
            for j in range(n_in // r):
                wij = w[i * r:(i + 1) * r, j * r:(j + 1) * r]
                new[i * r:(i + 1) * r, j * r:(j + 1) * r] = wij @ (eye + block[i]) + block[i]
        return new
    r = block.shape[0]
    for o in range(out):
        for j in range(n_in):
            col = o % mini_r if init_weights == "mini" else o
            new[o, j] += block[j % r, col]
    return new


class _MLP(nn.Module):
    """Linear (12 -> 8) -> ReLU -> Linear (8 -> 4); ``x: (B, 12)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _randomize(model: nn.Module, seed: int, scale: float = 0.3) -> None:
    """Random ``miss_block`` values (the default init is zeros), so the adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "miss_block" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))


def _mlp_peft(seed: int = 0, **kwargs: Any) -> PeftModel:
    torch.manual_seed(0)
    model = get_peft_model(_MLP(), MissConfig(target_modules=["lin0", "lin1"], **kwargs))
    _randomize(model, seed)
    return model.eval()


VARIANTS = [
    pytest.param({"r": 4}, id="miss"),
    pytest.param({"r": 3}, id="miss-padded"),  # lin1: in 8 is not divisible by 3, the last shard is padded
    pytest.param({"r": 2, "init_weights": "bat"}, id="bat"),
    pytest.param({"r": 4, "init_weights": "mini", "mini_r": 2}, id="mini"),
]
# float32 layers against float64 dense weights: reductions of 12 + 8 terms plus the shard sums
TOL = fp_tol(torch.float32, 2 * (12 + 8))


def _plain_forward(model: PeftModel, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The MLP with every adapted weight replaced by the plain ``W + ΔW`` of ``names`` applied in order."""
    net = model.base_model.model
    h = x.double()
    for i, layer in enumerate((net.lin0, net.lin1)):
        w = layer.get_base_layer().weight.detach().double()
        for name in names:
            init = {"miss": True}.get(layer.miss_mode[name], layer.miss_mode[name])
            w = plain_weight(w, layer.miss_block[name], init, layer.miss_mini_r[name])
        h = h @ w.T + layer.get_base_layer().bias.detach().double()
        if i == 0:
            h = torch.relu(h)
    return h


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_layer_matches_the_plain_weight(kwargs: dict[str, Any]) -> None:
    """``y = x (W + ΔW)ᵀ + b`` with ``W + ΔW`` built element by element here; the saved shapes are the reference's."""
    model = _mlp_peft(**kwargs)
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), _plain_forward(model, x, ["default"]), **TOL)
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    r, mode = kwargs["r"], kwargs.get("init_weights", True)
    expected = {"bat": (8 // r, r, r), "mini": (r, kwargs.get("mini_r", 1))}.get(mode, (r, 8))
    assert shapes["base_model.model.lin0.miss_block"] == expected


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_identity_at_init_is_exact(kwargs: dict[str, Any]) -> None:
    """Every default init (zeros; ``"bat"``: ``W (I + 0) + 0``) leaves the outputs unchanged to the bit."""
    torch.manual_seed(0)
    model = get_peft_model(_MLP(), MissConfig(target_modules=["lin0", "lin1"], **kwargs)).eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        out = model(x)
        with model.disable_adapter():
            assert torch.equal(out, model(x))


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_merge_unmerge_and_unload(kwargs: dict[str, Any]) -> None:
    """Merged outputs equal unmerged ones; unmerging restores the base weights (``"bat"``: through ``(I + B)⁻¹``);
    merge_and_unload gives plain modules with the same outputs."""
    model = _mlp_peft(**kwargs)
    x = torch.randn(5, 12)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, **TOL)
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in before:  # an r×r inverse and two products
                torch.testing.assert_close(p.detach(), before[n], **fp_tol(torch.float32, 4 * 12))
        merged = model.merge_and_unload()
        assert not any(isinstance(m, MissLayer) for m in merged.modules())
        torch.testing.assert_close(merged(x), unmerged, **TOL)


def test_adapters_of_different_variants_share_a_layer() -> None:
    """Each adapter keeps its own variant: the reference fixes the layer's variant from the first adapter
    (``MissLinear.miss_fn``), so a ``"bat"`` adapter added to a layer holding a default one runs the wrong formula
    (and fails on the block's shape). Alone and together (applied in order) they match the plain weights."""
    model = _mlp_peft(r=4)
    model.add_adapter("bat", MissConfig(target_modules=["lin0", "lin1"], r=2, init_weights="bat"))
    model.add_adapter("mini", MissConfig(target_modules=["lin0", "lin1"], r=4, init_weights="mini", mini_r=2))
    _randomize(model, 1)
    x = torch.randn(5, 12)
    with torch.no_grad():
        for names in (["default"], ["bat"], ["mini"], ["default", "bat"], ["bat", "mini", "default"]):
            model.base_model.set_adapter(names)
            torch.testing.assert_close(model(x).double(), _plain_forward(model, x, names), **TOL)
        # merging in the same order gives the same outputs
        expected = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, **TOL)


def test_mixed_batch_rows_follow_their_adapter() -> None:
    model = _mlp_peft(r=4)
    model.add_adapter("bat", MissConfig(target_modules=["lin0", "lin1"], r=2, init_weights="bat"))
    _randomize(model, 2)
    x = torch.randn(3, 12)
    with torch.no_grad():
        mixed = model(x, adapter_names=["bat", "__base__", "default"])
        singles = {}
        for name in ("default", "bat"):
            model.set_adapter(name)
            singles[name] = model(x)
        with model.disable_adapter():
            singles["__base__"] = model(x)
    for row, name in enumerate(["bat", "__base__", "default"]):
        torch.testing.assert_close(mixed[row], singles[name][row], **TOL)


def test_dropout_applies_to_the_shard_sum_in_training_only() -> None:
    model = _mlp_peft(r=4, miss_dropout=0.5)
    x = torch.randn(64, 12)
    with torch.no_grad():
        evaluated = model(x)
        model.train()
        torch.manual_seed(3)
        trained = model(x)
    assert (trained - evaluated).abs().max() > 1e-3
    torch.testing.assert_close(evaluated.double(), _plain_forward(model, x, ["default"]), **TOL)


def test_gradients_match_the_reference() -> None:
    """One loss, same weights: peftkit's gradients of ``miss_block`` equal the reference's, for each variant."""
    import peft

    x = torch.randn(6, 12)
    for kwargs in ({"r": 3}, {"r": 4, "bias": "all"}, {"r": 2, "init_weights": "bat"},
                   {"r": 4, "init_weights": "mini", "mini_r": 2}):
        ours = _mlp_peft(**kwargs).train()
        torch.manual_seed(0)
        ref = peft.get_peft_model(_MLP(), peft.MissConfig(target_modules=["lin0", "lin1"], **kwargs)).train()
        peft.set_peft_model_state_dict(ref, get_peft_model_state_dict(ours))
        ours(x).square().sum().backward()
        ref(x).square().sum().backward()
        grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        for n, p in ours.named_parameters():
            if p.requires_grad:  # the same sums in another order, over 6 rows and 12 + 8 inputs
                torch.testing.assert_close(p.grad, grads[n], **fp_tol(torch.float32, 6 * 20))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"),
    ({"mini_r": 0}, "mini_r"),
    ({"init_weights": "gaussian"}, "init_weights"),
    ({"miss_dropout": 1.5}, "miss_dropout"),
    ({"bias": "lora_only"}, "bias"),
    ({"target_modules": "lin.*", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": "lin.*", "layers_pattern": "layers"}, "layers_pattern"),
])
def test_config_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        MissConfig(**kwargs)
    assert info.value.field == field and isinstance(info.value, ValueError)


@pytest.mark.parametrize(("kwargs", "field", "words"), [
    ({"r": 16}, "r", "in_features=12"),  # r > in_features
    ({"r": 3, "init_weights": "bat"}, "r", "divisible by r"),  # lin0 (8, 12): 8 % 3 != 0
    ({"r": 4, "init_weights": "mini", "mini_r": 3}, "mini_r", "divisible by mini_r"),
])
def test_per_layer_shape_errors_name_the_field_and_module(kwargs: dict[str, Any], field: str, words: str) -> None:
    """The reference's ``ValueError`` checks against each layer's shape, raised before anything is injected."""
    with pytest.raises(ConfigError) as info:
        get_peft_model(_MLP(), MissConfig(target_modules=["lin0", "lin1"], **kwargs))
    assert info.value.field == field and words in str(info.value) and "'lin0'" in str(info.value)


def test_unsupported_modules_raise_typed_errors() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Embedding(10, 4))
    for name in ("0", "1"):
        with pytest.raises(UnsupportedModuleError) as info:
            get_peft_model(net, MissConfig(r=2, target_modules=[name]))
        assert isinstance(info.value, TypeError)


# ------------------------------------------------------------------------------------------------ interop
INTEROP = [
    pytest.param("llama-causal", {"r": 8}, id="llama"),
    pytest.param("llama-causal", {"r": 4, "init_weights": "bat"}, id="llama-bat"),
    pytest.param("bert-feat", {"r": 6}, id="bert-padded"),
    pytest.param("bert-feat", {"r": 8, "init_weights": "mini", "mini_r": 4}, id="bert-mini"),
    pytest.param("custom-mlp", {"r": 4, "bias": "all"}, id="mlp"),
    pytest.param("custom-mlp", {"r": 2, "init_weights": "bat"}, id="mlp-bat"),
]
ESSENTIALS = ("peft_type", "r", "mini_r", "miss_dropout", "init_weights", "bias", "layers_to_transform",
              "layers_pattern")


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Randomised blocks: the saved files have the same keys, shapes, dtypes and config essentials, and each library
    loads the other's file with the saver's outputs (1e-5)."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, **kwargs}
    check_interop_both_ways(case, lambda lib: lib.MissConfig(**kw), tmp_path, essentials=ESSENTIALS,
                            markers=None, perturb=lambda model, seed: _randomize(model, seed, scale=0.1),
                            tol={"atol": ATOL, "rtol": 0})


# ------------------------------------------------------------------------------------------------ quantized
#: merged-vs-unmerged output difference allowed, in units of the base's own quantization error (merging
#: re-quantizes; tests/test_quantized.py measures the same bound for LoRA)
QUANT_K = 5.0


@pytest.mark.parametrize("init", [True, "bat", "mini"])
def test_quantized_linear_matches_the_reference_and_merges(init: Any) -> None:
    """bitsandbytes 8-bit: the same outputs as the reference on the same quantized layer, only ``miss_block``
    trains, and merging (re-quantizing) stays within a few times the base's own quantization error."""
    import peft

    from peftkit.layers.dispatch import QUANT_LINEAR, module_kind

    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    cfg = {"r": 8, "init_weights": init, "mini_r": 4, "target_modules": ["0"]}
    ours = get_peft_model(nn.Sequential(quantized_linear("8bit", dense)), MissConfig(**cfg))
    _randomize(ours, 1, scale=0.05)
    ref = peft.get_peft_model(nn.Sequential(quantized_linear("8bit", dense)), peft.MissConfig(**cfg))
    peft.set_peft_model_state_dict(ref, get_peft_model_state_dict(ours))
    assert module_kind(ours.base_model.model[0]) == QUANT_LINEAR
    ours(x).square().mean().backward()
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.0.miss_block.default"]
    ours.eval()
    ref.eval()
    with torch.no_grad():
        quant_error = (nn.Sequential(quantized_linear("8bit", dense))(x) - dense(x)).abs().max().item()
        unmerged = ours(x)
        # same int8 kernel and the same float32 update: a few ulp of the 64-long sums
        torch.testing.assert_close(unmerged, ref(x), **fp_tol(torch.float32, 64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the QuantizedMergeWarning report
            ours.base_model.merge_adapter()
        assert (ours(x) - unmerged).abs().max().item() <= QUANT_K * quant_error


def test_default_targets_are_the_references() -> None:
    """Without ``target_modules`` the model type's table (a copy of LoRA's, as the reference's) picks the modules."""
    import peft
    from models import tiny_llama

    ours = get_peft_model(tiny_llama(), MissConfig(r=8, task_type="CAUSAL_LM"))
    ref = peft.get_peft_model(tiny_llama(), peft.MissConfig(r=8, task_type="CAUSAL_LM"))
    assert set(get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))
    assert set(ours.peft_config["default"].target_modules) == set(ref.peft_config["default"].target_modules)


@pytest.mark.parametrize(("n_in", "r", "bias"), [(12, 4, True), (10, 4, True), (12, 3, False)])
def test_training_fast_path_matches_the_plain_autograd_formula(n_in: int, r: int, bias: bool) -> None:
    """``SharedBlockLinear`` (forward in place, backward ``g (W + ΔW)``) against ``x Wᵀ + b + shard_sum(x) @ B``
    differentiated by autograd: outputs and the gradients of ``x``, ``b`` and ``B``."""
    from peftkit.methods.miss.fastpath import shared_block_linear

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, n_in, generator=gen)
    b = torch.randn(6, generator=gen).requires_grad_(bias)
    block = torch.randn(r, 6, generator=gen, requires_grad=True)
    x = torch.randn(2, 5, n_in, generator=gen, requires_grad=True)
    g = torch.randn(2, 5, 6, generator=gen)

    def plain() -> torch.Tensor:  # the shard sum written out: zero-pad to a multiple of r, sum the shards
        pad = torch.nn.functional.pad(x, (0, -n_in % r))
        return x @ weight.T + b + pad.reshape(2, 5, -1, r).sum(-2) @ block

    results = []
    for fn in (lambda: shared_block_linear(x, weight, b, block), plain):
        out = fn()
        grads = torch.autograd.grad(out, [x, block] + ([b] if bias else []), g)
        results.append((out, *grads))
    for fast, ref in zip(*results):  # the same sums in another order: reductions of n_in + r terms
        torch.testing.assert_close(fast, ref, **fp_tol(torch.float32, n_in + 2 * r))
