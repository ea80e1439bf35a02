"""GraLoRA (granular low-rank adaptation): the layer against a dense block-by-block update written here (Linear and
GPT-2 Conv1D, with and without the hybrid LoRA part), the in-place fast path's gradients, merging, mixed batches,
config errors, unsupported modules, and interop both ways with the reference (tiny Llama, BERT, GPT-2, an MLP).

The generic properties (identity, merge, save/load, multi-adapter, errors) come from the conformance suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from method_interop import check_interop_both_ways, interop_case
from models import tiny_llama
from numerics import fp_tol
from torch import nn

from peftkit import GraloraConfig, get_peft_model, get_peft_model_state_dict
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.gralora import GraloraLayer
from peftkit.methods.gralora.blocks import GraloraUpdate, gralora_update_reference

ATOL = 1e-5  # issue 22: interop outputs within 1e-5


# ------------------------------------------------------------------------------------------------ plain math
def plain_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, A_g: torch.Tensor | None = None,
                B_g: torch.Tensor | None = None) -> torch.Tensor:
    """``ΔW: (out, in)`` in float64 by the paper's block formula, one block at a time: with ``s = r / k``, block
    ``(j, n)`` (output block ``j``, input block ``n``) is ``(A[n][:, j·s:(j+1)·s] @ B[j][n·s:(n+1)·s, :])ᵀ``; plus the
    hybrid ``B_g @ A_g``; times ``scaling``."""
    A, B = A.detach().double(), B.detach().double()
    k, i, r = A.shape
    o, s = B.shape[2], r // k
    delta = torch.zeros(k * o, k * i, dtype=torch.float64)
    for j in range(k):
        for n in range(k):
            block = A[n][:, j * s:(j + 1) * s] @ B[j][n * s:(n + 1) * s, :]  # (i, o)
            delta[j * o:(j + 1) * o, n * i:(n + 1) * i] = block.T
    if A_g is not None:
        delta += B_g.detach().double() @ A_g.detach().double()
    return delta * scaling


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    layer = Conv1D(n_out, n_in)
    nn.init.normal_(layer.weight, std=0.2)
    return layer


class _Net(nn.Module):
    """Linear (12 -> 8) -> ReLU -> GPT-2 Conv1D (8 -> 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 8)
        self.conv1d = _conv1d(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1d(torch.relu(self.lin(x)))


@pytest.mark.parametrize(("k", "r", "hybrid_r"), [(1, 2, 0), (2, 4, 0), (4, 4, 0), (2, 2, 3), (4, 8, 1)])
def test_layers_match_plain_block_formula(k: int, r: int, hybrid_r: int) -> None:
    """Each layer's output is ``base(x) + x ΔWᵀ`` with ``ΔW`` built block by block here, and ``get_delta_weight`` is
    that ``ΔW`` in the base weight's layout (``(in, out)`` for Conv1D)."""
    torch.manual_seed(0)
    config = GraloraConfig(r=r, gralora_k=k, hybrid_r=hybrid_r, alpha=5, target_modules=["lin", "conv1d"],
                           init_weights=False)
    model = get_peft_model(_Net(), config).double().eval()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    net = model.base_model.model
    lin, conv = net.lin, net.conv1d
    assert isinstance(lin, GraloraLayer) and isinstance(conv, GraloraLayer)
    deltas = {}
    for name, layer in (("lin", lin), ("conv1d", conv)):
        A, B = layer.gralora_A["default"], layer.gralora_B["default"]
        assert A.shape == (k, layer.in_features // k, r) and B.shape == (k, r, layer.out_features // k)
        gen = layer.gralora_A_general["default"], layer.gralora_B_general["default"]
        a_g, b_g = (gen[0].weight, gen[1].weight) if hybrid_r else (None, None)
        deltas[name] = plain_delta(A, B, 5 / (r + hybrid_r), a_g, b_g)
        expected_layout = deltas[name].T if name == "conv1d" else deltas[name]
        torch.testing.assert_close(layer.get_delta_weight("default"), expected_layout, atol=1e-12, rtol=1e-12)
    w_lin, b_lin = lin.base_layer.weight.detach(), lin.base_layer.bias.detach()
    w_conv, b_conv = conv.base_layer.weight.detach(), conv.base_layer.bias.detach()
    hidden = torch.relu(x @ (w_lin + deltas["lin"]).T + b_lin)
    expected = hidden @ (w_conv.T + deltas["conv1d"]).T + b_conv
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("hybrid_r", [0, 3])
@pytest.mark.parametrize("x_grad", [True, False])
def test_inplace_update_gradients_match_reference(hybrid_r: int, x_grad: bool) -> None:
    """The in-place autograd function gives the plain autograd formula's values and gradients (float64, so any
    difference is a wrong formula, not rounding)."""
    torch.manual_seed(1)
    k, i, o, r = 4, 5, 6, 8
    x = torch.randn(3, 7, k * i, dtype=torch.float64, requires_grad=x_grad)
    factors = [torch.randn(k, i, r, dtype=torch.float64), torch.randn(k, r, o, dtype=torch.float64)]
    if hybrid_r:
        factors += [torch.randn(hybrid_r, k * i, dtype=torch.float64), torch.randn(k * o, hybrid_r, dtype=torch.float64)]
    factors = [f.requires_grad_() for f in factors]
    a_g, b_g = (factors[2], factors[3]) if hybrid_r else (None, None)
    w = torch.randn(k * o, k * i, dtype=torch.float64)
    probe = torch.randn(3, 7, k * o, dtype=torch.float64)
    inputs = [x, *factors] if x_grad else factors

    def run(fast: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        base = nn.functional.linear(x, w)
        if fast:
            out = GraloraUpdate.apply(base, x, factors[0], factors[1], 0.7, a_g, b_g)
        else:
            out = base + gralora_update_reference(x, factors[0], factors[1], 0.7, a_g, b_g)
        return out.detach(), torch.autograd.grad((out * probe).sum(), inputs)

    (out_fast, grads_fast), (out_ref, grads_ref) = run(True), run(False)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-12, rtol=1e-12)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 4, 8)])
def test_any_number_of_leading_dims(shape: tuple[int, ...]) -> None:
    """Inputs ``(..., in)`` with any number of leading dimensions get ``base(x) + x ΔWᵀ`` (the reference unpacks
    ``B, L, in = x.shape`` and raises ``ValueError`` for 4-d inputs such as channels-last image features)."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 6)), GraloraConfig(r=2, hybrid_r=1, target_modules=["0"],
                                                                         init_weights=False)).double().eval()
    layer = model.base_model.model[0]
    x = torch.randn(*shape, dtype=torch.float64)
    gen = layer.gralora_A_general["default"].weight, layer.gralora_B_general["default"].weight
    delta = plain_delta(layer.gralora_A["default"], layer.gralora_B["default"], 64 / 3, *gen)
    expected = x @ (layer.base_layer.weight.detach() + delta).T + layer.base_layer.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)


def _llama_model(seed: int = 0, **kwargs: Any) -> Any:
    torch.manual_seed(seed)
    config = GraloraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                           task_type="CAUSAL_LM", **kwargs)
    return get_peft_model(tiny_llama(), config).eval()


IDS = torch.tensor([[1, 5, 9, 3, 60, 7], [4, 8, 2, 6, 10, 12]])
TOL = fp_tol(torch.float32, 200)  # the tiny Llama: merged weights and unmerged updates sum in other orders


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_merge_unmerge_and_unload_keep_outputs(hybrid_r: int) -> None:
    """Merged outputs equal the unmerged ones; unmerge restores the base weights; merge_and_unload keeps outputs."""
    model = _llama_model(hybrid_r=hybrid_r)
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
        assert (before - base).abs().max() > 1e-3
        weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=IDS).logits, before, **TOL)
        model.unmerge_adapter()
        for name, param in model.named_parameters():
            if name in weights:
                torch.testing.assert_close(param, weights[name], **fp_tol(torch.float32, 4))
        torch.testing.assert_close(model(input_ids=IDS).logits, before, **TOL)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, GraloraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=IDS).logits, before, **TOL)


def test_mixed_batch_routes_each_row_to_its_adapter() -> None:
    """``adapter_names=[...]`` applies each row's adapter."""
    model = _llama_model()
    model.add_adapter("other", GraloraConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False,
                                             hybrid_r=2))
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["default", "other"]).logits
        model.set_adapter("other")
        other = model(input_ids=IDS).logits
        model.set_adapter("default")
        default = model(input_ids=IDS).logits
    assert (other[1] - default[1]).abs().max() > 1e-3
    torch.testing.assert_close(mixed[0], default[0], **TOL)
    torch.testing.assert_close(mixed[1], other[1], **TOL)


def _gpt2_model(seed: int = 0, **kwargs: Any) -> Any:
    from models import tiny_gpt2

    torch.manual_seed(seed)
    config = GraloraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj"], init_weights=False,
                           task_type="CAUSAL_LM", **kwargs)
    return get_peft_model(tiny_gpt2(), config).eval()


@pytest.mark.parametrize("build", [_llama_model, _gpt2_model], ids=["llama-linear", "gpt2-conv1d"])
def test_training_step_updates_only_adapter_tensors_and_matches_reference_grads(build: Any) -> None:
    """One backward through the in-place path (on Conv1D: on the tensor its output is a view of) gives the plain
    formula's loss and gradients for every adapter tensor."""
    grads, losses = [], []
    for fast in (True, False):
        model = build(hybrid_r=2)
        model.train()
        if not fast:  # hooks make the layers take the plain out-of-place path
            for module in model.modules():
                if isinstance(module, GraloraLayer):
                    module._inplace = False
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.detach())
        named = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert named and all("gralora_" in n for n in named)
        grads.append(named)
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], **TOL)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 6, "gralora_k": 4}, "r"),
        ({"gralora_k": 0}, "gralora_k"),
        ({"r": 0}, "r"),
        ({"hybrid_r": -1}, "hybrid_r"),
        ({"gralora_dropout": 1.5}, "gralora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"alpha": "64"}, "alpha"),
        ({"init_weights": "yes"}, "init_weights"),
        ({"layers_to_transform": "0"}, "layers_to_transform"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    """Bad values raise ConfigError (a ValueError, as the reference) naming the field."""
    with pytest.raises(ConfigError) as info:
        GraloraConfig(**kwargs)
    assert info.value.field == field and isinstance(info.value, ValueError)


def test_block_count_must_divide_the_layer() -> None:
    """``gralora_k`` must divide ``in`` and ``out`` of every targeted layer (the reference's ValueError)."""
    model = nn.Sequential(nn.Linear(6, 9))
    with pytest.raises(ConfigError, match="out_features") as info:
        get_peft_model(model, GraloraConfig(r=2, gralora_k=2, target_modules=["0"]))
    assert info.value.field == "gralora_k"


def test_unsupported_modules_are_refused() -> None:
    """Embeddings and convolutions are refused (the reference raises ``TypeError``)."""
    for module in (nn.Embedding(10, 4), nn.Conv2d(4, 4, 3)):
        with pytest.raises(UnsupportedModuleError, match="GraLoRA supports") as info:
            get_peft_model(nn.Sequential(module), GraloraConfig(r=2, target_modules=["0"]))
        assert isinstance(info.value, TypeError)


# ------------------------------------------------------------------------------------------------ interop
INTEROP = [
    pytest.param("llama-causal", {"r": 4}, id="llama"),
    pytest.param("llama-causal", {"r": 4, "gralora_k": 4, "hybrid_r": 2, "alpha": 6}, id="llama-hybrid"),
    pytest.param("bert-feat", {"r": 2, "hybrid_r": 1}, id="bert"),
    pytest.param("gpt2-causal", {"r": 4, "target_modules": ["c_attn", "c_proj"]}, id="gpt2-conv1d"),
    pytest.param("custom-mlp", {"r": 4, "alpha": 8, "bias": "gralora_only", "target_modules": ["lin0", "lin1"]}, id="mlp"),
]
ESSENTIALS = ("peft_type", "r", "hybrid_r", "alpha", "gralora_k", "gralora_dropout", "init_weights", "bias",
              "layers_to_transform", "layers_pattern")


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Random (non-identity) adapters: the saved files have the same keys, shapes, dtypes and config essentials,
    and each library loads the other's file with the saver's outputs (1e-5)."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, "init_weights": False, **kwargs}
    check_interop_both_ways(case, lambda lib: lib.GraloraConfig(**kw), tmp_path, markers=("gralora_",),
                            essentials=ESSENTIALS, tol={"atol": ATOL, "rtol": ATOL})


def test_default_targets_are_the_references() -> None:
    """Without ``target_modules`` the model type's table (a copy of LoRA's, as the reference's) picks the modules."""
    import peft

    ours = get_peft_model(tiny_llama(), GraloraConfig(r=4, task_type="CAUSAL_LM"))
    ref = peft.get_peft_model(tiny_llama(), peft.GraloraConfig(r=4, task_type="CAUSAL_LM"))
    assert set(get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_inspect_reports_the_update_norm(hybrid_r: int, tmp_path: Path) -> None:
    """``peftkit inspect`` reports each layer's shape, rank ``r + hybrid_r`` and ``‖ΔW‖_F`` (hybrid part included)."""
    from peftkit.cli.inspect_cmd import inspect_adapter

    model = _llama_model(hybrid_r=hybrid_r)
    model.save_pretrained(tmp_path)
    layers = {entry["module"]: entry for entry in inspect_adapter(str(tmp_path))["layers"]}
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    entry = layers["model.layers.1.self_attn.v_proj"]
    assert entry["shape"] == [layer.out_features, layer.in_features] and entry["rank"] == 4 + hybrid_r
    # float64 from the file against the float32 layer: float32 rounding of a 32-term reduction
    assert entry["norm"] == pytest.approx(float(layer.get_delta_weight("default").norm()), rel=1e-5)


def test_full_rank_lora_conversion_reproduces_the_adapter(tmp_path: Path) -> None:
    """``save_as_lora`` at full rank (the layers answer ``supports_lora_conversion`` True, as the reference's) writes a
    LoRA that both libraries load with the GraLoRA model's outputs."""
    import peft
    from models import MLP

    import peftkit

    case = interop_case("custom-mlp")
    inputs = case.make_inputs(3)
    torch.manual_seed(0)
    model = get_peft_model(MLP(), GraloraConfig(r=2, hybrid_r=1, target_modules=["lin0"], init_weights=False))
    model.eval()
    with torch.no_grad():
        expected = model(**inputs)
    peftkit.save_as_lora(tmp_path / "lora", model, rank=10)  # lin0: rank(ΔW) <= min(in, out) = 10
    for lib in (peftkit, peft):
        torch.manual_seed(0)
        loaded = lib.PeftModel.from_pretrained(MLP(), str(tmp_path / "lora")).eval()
        with torch.no_grad():
            # SVD factors against the dense delta: float32 rounding of a 20-term reduction
            torch.testing.assert_close(loaded(**inputs), expected, **fp_tol(torch.float32, 20, factor=16))
