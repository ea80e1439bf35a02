"""VeRA: the layer against the paper's formula written here (with projections drawn here), bit-exact projections
against the reference's generator, sharing of the projections (one object per model), merging, several adapters and
their checks, config errors, and interop both ways with the reference (tiny Llama, BERT, GPT-2 Conv1D, an MLP), with
and without saved projections.

The generic properties (identity, merge, save/load, multi-adapter, errors) come from the conformance suite.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from method_interop import check_interop_both_ways, interop_case
from models import MLP, tiny_llama
from numerics import fp_tol
from safetensors.torch import load_file
from torch import nn

from peftkit import PeftModel, VeraConfig, get_peft_model, get_peft_model_state_dict
from peftkit.errors import AdapterConflictError, AdapterLoadError, ConfigError, UnsupportedModuleError
from peftkit.methods.vera import VeraLayer

ATOL = 1e-5  # issue 22: interop outputs within 1e-5


def plain_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's frozen random A: (r, max_in), B: (max_out, r), kaiming-uniform (gain sqrt(2), fan_in) from one
    seeded CPU generator, A drawn first."""
    g = torch.Generator().manual_seed(seed)
    a = torch.empty(r, max_in).uniform_(-math.sqrt(6 / max_in), math.sqrt(6 / max_in), generator=g)
    b = torch.empty(max_out, r).uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=g)
    return a, b


def _perturbed_mlp(**kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(MLP(), VeraConfig(target_modules=["lin0", "lin1"], init_weights=False, **kwargs))
    return model


def test_projections_are_bit_exact_with_the_references_generator() -> None:
    from peft.tuners.vera.model import _kaiming_init

    g = torch.Generator().manual_seed(7)
    ref_a, ref_b = _kaiming_init((8, 20), generator=g), _kaiming_init((20, 8), generator=g)
    model = get_peft_model(MLP(), VeraConfig(target_modules=["lin0", "lin1"], r=8, projection_prng_key=7))
    shared = model.base_model.model.lin0.vera_projections
    assert torch.equal(shared.vera_A, ref_a) and torch.equal(shared.vera_B, ref_b)
    plain_a, plain_b = plain_projections(7, 8, 20, 20)
    torch.testing.assert_close(shared.vera_A, plain_a, atol=1e-6, rtol=1e-6)  # sqrt rounding order only
    torch.testing.assert_close(shared.vera_B, plain_b, atol=1e-6, rtol=1e-6)


def test_forward_matches_the_papers_formula() -> None:
    """y = W x + b + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x))) for each adapted layer (MLP lin0: 10 -> 20, lin1: 20 -> 2,
    so A is sliced by columns and B by rows)."""
    model = _perturbed_mlp(r=6, projection_prng_key=3)
    base = model.base_model.model
    a, b = plain_projections(3, 6, 20, 20)
    x = torch.randn(5, 10)

    def adapted(layer: VeraLayer, h: torch.Tensor) -> torch.Tensor:
        lin = layer.get_base_layer()
        ld, lb = layer.vera_lambda_d["default"].detach(), layer.vera_lambda_b["default"].detach()
        delta = lb * ((ld * (h @ a[:, : lin.in_features].T)) @ b[: lin.out_features].T)
        return h @ lin.weight.T + lin.bias + delta

    expected = adapted(base.lin1, torch.relu(adapted(base.lin0, x)))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **fp_tol(torch.float32, 2 * (20 + 6)))


def test_projections_are_shared_once_per_model() -> None:
    model = get_peft_model(tiny_llama(), VeraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4))
    layers = [m for m in model.modules() if isinstance(m, VeraLayer)]
    assert len(layers) > 2 and len({id(m.vera_projections) for m in layers}) == 1
    buffers = [n for n, _ in model.named_buffers() if "vera_" in n]
    assert len(buffers) == 2  # vera_A and vera_B once
    sizes = {(m.in_features, m.out_features) for m in layers}
    shared = layers[0].vera_projections
    assert shared.vera_A.shape == (4, max(i for i, _ in sizes)) and shared.vera_B.shape == (max(o for _, o in sizes), 4)
    assert not any(k.endswith(("vera_A", "vera_B")) and "layers" in k for k in model.state_dict())


def test_identity_at_init_and_only_vectors_train() -> None:
    model = get_peft_model(MLP(), VeraConfig(target_modules=["lin0", "lin1"], r=4))
    x = torch.randn(3, 10)
    with torch.no_grad():
        adapted = model(x)
        with model.disable_adapter():
            torch.testing.assert_close(adapted, model(x), atol=0, rtol=0)  # λ_b = 0: the update is exactly zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("vera_lambda_" in n for n in trainable)
    layer = model.base_model.model.lin0
    assert torch.all(layer.vera_lambda_b["default"] == 0) and torch.all(layer.vera_lambda_d["default"] == 0.1)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_equal_the_unmerged_output(safe_merge: bool) -> None:
    model = _perturbed_mlp(r=4).eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        expected = model(x)
        weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
        model.merge_adapter(safe_merge=safe_merge)
        torch.testing.assert_close(model(x), expected, **fp_tol(torch.float32, 2 * (20 + 4)))
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], **fp_tol(torch.float32, 4))
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, **fp_tol(torch.float32, 2 * (20 + 4)))


def test_gpt2_conv1d_delta_weight_has_the_conv1d_layout() -> None:
    case = interop_case("gpt2-causal")
    model = get_peft_model(case.build(), VeraConfig(target_modules=["c_attn"], r=4, init_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, VeraLayer))
    assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape


def test_second_adapter_shares_the_projections_and_is_checked() -> None:
    model = get_peft_model(MLP(), VeraConfig(target_modules=["lin0", "lin1"], r=4))
    model.add_adapter("other", VeraConfig(target_modules=["lin1"], r=4))
    layers = [m for m in model.modules() if isinstance(m, VeraLayer)]
    assert len({id(m.vera_projections) for m in layers}) == 1
    with pytest.raises(AdapterConflictError, match="projection_prng_key"):
        model.add_adapter("seed", VeraConfig(target_modules=["lin0"], r=4, projection_prng_key=1))
    with pytest.raises(AdapterConflictError, match="save_projection"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("nosave", VeraConfig(target_modules=["lin0"], r=4, save_projection=False))
    with pytest.raises(AdapterConflictError, match="r=2"):
        model.add_adapter("small", VeraConfig(target_modules=["lin0"], r=2))
    assert set(model.peft_config) == {"default", "other"}
    model.delete_adapter("other")
    model.delete_adapter("default")  # no VeRA adapter left: a new one may use another seed and r
    model.add_adapter("fresh", VeraConfig(target_modules=["lin0"], r=2, projection_prng_key=9))
    assert model.base_model.model.lin0.vera_projections.vera_A.shape == (2, 10)

    small = get_peft_model(MLP(), VeraConfig(target_modules=["lin1"], r=4))  # lin1: 20 -> 2
    with pytest.raises(AdapterConflictError, match="do not fit"):
        small.add_adapter("big", VeraConfig(target_modules=["lin0"], r=4))  # lin0: out 20 > 2


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"), ({"r": 2.5}, "r"), ({"vera_dropout": 1.0}, "vera_dropout"), ({"bias": "some"}, "bias"),
    ({"projection_prng_key": "x"}, "projection_prng_key"), ({"save_projection": 1}, "save_projection"),
    ({"layers_pattern": "layers"}, "layers_pattern"), ({"d_initial": "a"}, "d_initial"),
])
def test_config_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        VeraConfig(**kwargs)
    assert err.value.field == field


def test_unsupported_module_raises_a_typed_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(UnsupportedModuleError):
        get_peft_model(model, VeraConfig(target_modules=["0"]))


def test_missing_projections_with_save_projection_raise(tmp_path: Path) -> None:
    model = _perturbed_mlp(r=4)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(tensors)
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if "vera_lambda" in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="save_projection"):
        PeftModel.from_pretrained(MLP(), tmp_path)


# ------------------------------------------------------------------------------------------------ interop
INTEROP = [
    pytest.param("llama-causal", {"r": 4, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
                 id="llama"),
    pytest.param("llama-causal", {"r": 8, "save_projection": False, "projection_prng_key": 5}, id="llama-noproj"),
    pytest.param("bert-seqcls", {"r": 4}, id="bert"),
    pytest.param("gpt2-causal", {"r": 4, "target_modules": ["c_attn", "c_proj"]}, id="gpt2-conv1d"),
    pytest.param("custom-mlp", {"r": 4, "bias": "vera_only"}, id="mlp"),
]
ESSENTIALS = ("peft_type", "r", "projection_prng_key", "save_projection", "d_initial", "init_weights", "bias",
              "layers_to_transform", "layers_pattern")


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Non-identity adapters (λ_b = 1, λ_d ~ N(0, 1)): the saved files have the same keys, shapes, dtypes and config
    essentials, and each library loads the other's file with the saver's outputs (1e-5)."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, "init_weights": False, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False warns, fan_in_fan_out for Conv1D warns
        check_interop_both_ways(case, lambda lib: lib.VeraConfig(**kw), tmp_path, markers=None,
                                essentials=ESSENTIALS, tol={"atol": ATOL, "rtol": 0})
    if kw.get("save_projection", True):  # same seed: bit-exact projections
        a, b = (load_file(tmp_path / lib / "adapter_model.safetensors") for lib in ("ours", "ref"))
        assert torch.equal(a["base_model.vera_A"], b["base_model.vera_A"])


def test_default_targets_are_the_references() -> None:
    import peft

    ours = get_peft_model(tiny_llama(), VeraConfig(task_type="CAUSAL_LM", r=4))
    ref = peft.get_peft_model(tiny_llama(), peft.VeraConfig(task_type="CAUSAL_LM", r=4))
    assert set(get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))
    assert set(ours.peft_config["default"].target_modules) == set(ref.peft_config["default"].target_modules)


def test_inspect_strength_is_the_expected_norm_of_the_update() -> None:
    """The strength ``peftkit inspect`` reports from the vectors alone is E‖ΔW‖_F over the random projections;
    for a layer as wide as the widest one it matches the actual norm within the sampling spread (r=256: ~5%)."""
    from peftkit.methods.vera import VERA

    model = get_peft_model(nn.Sequential(nn.Linear(512, 384)), VeraConfig(target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    params = {k: v.detach() for k, v in (("vera_lambda_b", layer.vera_lambda_b["default"]),
                                         ("vera_lambda_d", layer.vera_lambda_d["default"]))}
    shape, rank, strength, _ = VERA.update_strength(params, {"r": 256})
    assert shape == [384, 256] and rank == 256
    actual = float(layer.get_delta_weight("default").norm())
    assert abs(strength / actual - 1) < 0.1


def test_gradients_match_the_reference(tmp_path: Path) -> None:
    """The folded forward (λ into the factors, in-place add) gives the reference's gradients of λ_b and λ_d."""
    import peft

    case = interop_case("llama-causal")
    kw = {"target_modules": ["q_proj", "v_proj", "down_proj", "up_proj"], "r": 8, "init_weights": False}
    torch.manual_seed(0)
    ours = get_peft_model(case.build(), VeraConfig(**kw))
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(case.build(), tmp_path, is_trainable=True)
    inputs = case.make_inputs(2)
    for model in (ours, ref):
        model.train()
        model(**{"labels": inputs["input_ids"], **inputs}).loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == grads.keys() and len(mine) == 16
    for n, g in mine.items():
        # summed over the batch's tokens through the tiny model: reduction of a few hundred terms per entry
        torch.testing.assert_close(g, grads[n], **fp_tol(torch.float32, 4 * 256))


@pytest.mark.parametrize("keep_product", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_lean_update_matches_the_plain_update_and_its_gradients(x_grad: bool, keep_product: bool) -> None:
    """``ops.vera.add_vera_`` (in place, recomputed λ_b gradient) against the reference's order of ops: same output
    and gradients of x, λ_d and λ_b; the frozen projections get none."""
    from peftkit.ops.vera import add_vera_, vera_update_reference

    torch.manual_seed(0)
    a_full, b_full = torch.randn(8, 24), torch.randn(20, 8)
    a, b = a_full[:, :12], b_full[:16]  # slices of shared projections, as the layers use them
    x0 = torch.randn(3, 5, 12)
    w = torch.randn(16, 12, requires_grad=True)
    outs, grads = [], []
    for fn in (add_vera_, vera_update_reference):
        ld = torch.randn(8, requires_grad=True)
        lb = torch.randn(16, requires_grad=True)
        torch.manual_seed(1)
        ld.data, lb.data = torch.randn(8), torch.randn(16)
        x = x0.clone().requires_grad_(x_grad)
        base = torch.nn.functional.linear(x, w)
        out = fn(base, x, a, b, ld, lb, keep_product) if fn is add_vera_ else fn(base, x, a, b, ld, lb)
        assert (out is base) == (fn is add_vera_)  # the fast path writes into the base output
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (x, ld, lb, w) if t.requires_grad])
        w.grad = None
    tol = fp_tol(torch.float32, 12 + 8 + 16)  # reductions over in, r and the out features of one update
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for mine, ref in zip(grads[0], grads[1]):
        torch.testing.assert_close(mine, ref, **fp_tol(torch.float32, 15 * (12 + 8 + 16)))
