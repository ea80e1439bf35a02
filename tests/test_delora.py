"""DeLoRA (``DeloraConfig``): the update against a plain implementation of the paper's formula, interop with the
reference both ways (tiny Llama, BERT, a custom MLP), merge/unmerge, mixed batches, what autograd keeps, saved
column norms, typed config errors."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from method_interop import (
    case_model,
    case_output,
    check_interop_both_ways,
    check_mixed_batch_rows,
    interop_case,
    perturb_adapter,
)
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.delora import DeloraLayer
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")

LLAMA = "llama-causal"  # the model case (tests/models.py) of the Llama tests
MARKERS = ("delora_",)
#: both libraries run the same math in another order (scaled A against scaled activations): a few ulp per term of
#: the tiny models' longest reductions (tests/numerics.py); tighter than the issue's 1e-5
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)


def _layers(model: nn.Module) -> list[DeloraLayer]:
    return [m for m in model.modules() if isinstance(m, DeloraLayer)]


def _config(lib: Any, case_name: str, **kwargs: Any) -> Any:
    case = interop_case(case_name)
    return lib.DeloraConfig(**{"target_modules": list(case.target_modules), "task_type": case.task_type, **kwargs})


# ------------------------------------------------------------------------------------------------ the formula


def plain_delora_delta(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, lam: float, r: int) -> torch.Tensor:
    """The paper's ``ΔW = (λ ‖W‖ / r) · B Ξ A`` with ``Ξ = diag(1 / (‖b_i‖ ‖a_i‖))``, where ``‖W‖`` acts as the
    diagonal of ``W``'s column norms on the right, written as a sum of normalised rank-1 terms (float64)."""
    W, A, B = W.double(), A.double(), B.double()
    delta = torch.zeros(W.shape, dtype=torch.float64)
    for i in range(r):
        a, b = A[i], B[:, i]
        delta += torch.outer(b, a) / (max(float(b.norm()), 1e-4) * max(float(a.norm()), 1e-4))
    col_norms = torch.stack([W[:, j].norm() for j in range(W.shape[1])])
    return lam / r * delta * col_norms[None, :]


@pytest.mark.parametrize("bias", [True, False])
def test_layer_output_is_base_plus_plain_formula(bias: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias)
    W = base.weight.detach().clone()
    model = peftkit.get_peft_model(nn.Sequential(base), peftkit.DeloraConfig(
        r=3, delora_lambda=4, target_modules=["0"], init_weights=False))
    layer = _layers(model)[0]
    x = torch.randn(5, 12)
    delta = plain_delora_delta(W, layer.delora_A["default"].detach(), layer.delora_B["default"].detach(), 4.0, 3)
    expected = base(x).double() + x.double() @ delta.T  # base(x): the wrapped layer's own base output
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, **fp_tol(torch.float32, 12 + 3))
        torch.testing.assert_close(layer.get_delta_weight("default").double(), delta, **fp_tol(torch.float32, 3))
    # the bound of the method: ‖ΔW‖_F <= λ · max_j ‖W_:,j‖
    assert float(delta.norm()) <= 4.0 * float(W.norm(dim=0).max()) + 1e-9


def test_gradients_match_the_references_formula() -> None:
    """Forward and backward of peftkit's folded form against the reference's activation-scaling form (values and
    the gradients of ``A``, ``B``, ``λ`` and of the input)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 9, bias=False).requires_grad_(False)
    model = peftkit.get_peft_model(nn.Sequential(base), peftkit.DeloraConfig(
        r=4, target_modules=["0"], init_weights=False))
    layer = _layers(model)[0]
    A, B, lam = (layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"])
    w = layer.delora_w_norm["default"]
    x = torch.randn(6, 16, requires_grad=True)
    ours = model(x)
    grad = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (A, B, lam, x), grad)
    # the reference's forward, written out: ((x * w) Aᵀ · s) Bᵀ
    s = lam / 4 / (A.norm(dim=1).clamp(min=1e-4) * B.norm(dim=0).clamp(min=1e-4))
    theirs = base(x) + ((x * w) @ A.T * s) @ B.T
    want = torch.autograd.grad(theirs, (A, B, lam, x), grad)
    torch.testing.assert_close(ours, theirs, **fp_tol(torch.float32, 16 + 4))
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, **fp_tol(torch.float32, 16 + 4 + 6))


def test_identity_at_init_and_column_norms_are_frozen() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, r=4))
    case = interop_case(LLAMA)
    torch.testing.assert_close(case_output(model, case), case_output(case_model(LLAMA), case), atol=0, rtol=0)
    for layer in _layers(model):
        norms = layer.get_base_layer().weight.detach().norm(dim=0)
        torch.testing.assert_close(layer.delora_w_norm["default"], norms, **fp_tol(torch.float32, 32))
        assert not layer.delora_w_norm["default"].requires_grad
        assert layer.delora_lambda["default"].tolist() == [15.0]  # the default delora_lambda
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"delora_A", "delora_B", "delora_lambda"}


# ------------------------------------------------------------------------------------------------ interop
INTEROP = [
    pytest.param(LLAMA, {"r": 4}, id="llama"),
    pytest.param(LLAMA, {"r": 4, "delora_lambda": 3, "rank_pattern": {"v_proj": 2},
                         "lambda_pattern": {r"layers\.1\.self_attn\.q_proj": 7}}, id="llama-patterns"),
    pytest.param("bert-feat", {"r": 2, "module_dropout": 0.1}, id="bert"),
    pytest.param("custom-mlp", {"r": 2, "target_modules": ["lin0", "lin1"], "bias": "delora_only"}, id="mlp"),
]
ESSENTIALS = ("r", "delora_lambda", "module_dropout", "bias", "init_weights", "rank_pattern", "lambda_pattern",
              "layers_to_transform", "layers_pattern")


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path) -> None:
    """Perturbed adapters (A, B, λ and the saved column norms): the same saved keys, shapes, dtypes and config
    essentials, and each library loads the other's file with the saver's outputs (1e-5)."""
    check_interop_both_ways(case_name, lambda lib: _config(lib, case_name, **kwargs), tmp_path, markers=MARKERS,
                            essentials=ESSENTIALS, min_change=1e-3)


def test_saved_column_norms_are_used_not_recomputed(tmp_path) -> None:
    """``delora_w_norm`` is part of the adapter: loading onto a base whose weights changed since uses the saved
    norms (as the reference), so a loaded adapter reproduces the saver's update exactly."""
    model = peftkit.get_peft_model(case_model("custom-mlp"), _config(peftkit, "custom-mlp", r=2)).eval()
    perturb_adapter(model, MARKERS, seed=3)
    saved = _layers(model)[0].delora_w_norm["default"].detach().clone()
    model.save_pretrained(str(tmp_path))
    other = case_model("custom-mlp")
    with torch.no_grad():
        other.lin0.weight.mul_(2.0)
    loaded = peftkit.PeftModel.from_pretrained(other, str(tmp_path))
    layer = _layers(loaded)[0]
    assert torch.equal(layer.delora_w_norm["default"], saved)
    torch.testing.assert_close(layer.get_delta_weight("default"), _layers(model)[0].get_delta_weight("default"),
                               atol=0, rtol=0)


def test_column_norms_of_a_half_precision_base_are_computed_in_float32() -> None:
    """The reference takes the norms in the base dtype (bfloat16: 8 significant bits) before upcasting them to the
    float32 adapter; peftkit reduces in float32, so the saved norms carry no bfloat16 rounding."""
    torch.manual_seed(0)
    base = nn.Linear(64, 16).to(torch.bfloat16)
    config = {"r": 2, "target_modules": ["0"]}
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.DeloraConfig(**config))
    ours = _layers(peftkit.get_peft_model(nn.Sequential(base), peftkit.DeloraConfig(**config)))[0]
    exact = torch.linalg.vector_norm(base.weight.float(), dim=0)
    w = ours.delora_w_norm["default"]
    assert w.dtype == torch.float32 and torch.equal(w, exact)  # the same float32 kernel on the same data
    ref_w = theirs.base_model.model[0].delora_w_norm["default"]
    assert ref_w.dtype == torch.float32 and torch.equal(ref_w, exact.to(torch.bfloat16).float())


# ------------------------------------------------------------------------------------------------ merging


def test_merge_unmerge_and_merge_and_unload_match_unmerged_outputs() -> None:
    case = interop_case(LLAMA)
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, r=4)).eval()
    perturb_adapter(model, MARKERS, seed=3)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    expected = case_output(model, case)
    model.merge_adapter()
    torch.testing.assert_close(case_output(model, case), expected, **TOL)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:  # (W + ΔW) - ΔW: two roundings of each entry
            torch.testing.assert_close(p.detach(), weights[n], **fp_tol(torch.float32, 4))
    torch.testing.assert_close(case_output(model, case), expected, **TOL)
    merged = model.merge_and_unload()
    assert not _layers(merged)
    torch.testing.assert_close(case_output(merged, case), expected, **TOL)


def test_merge_matches_reference_merge() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, r=4)).eval()
    perturb_adapter(model, MARKERS, seed=3)
    ref = peft.get_peft_model(case_model(LLAMA), _config(peft, LLAMA, r=4)).eval()
    ref.load_state_dict(model.state_dict())
    ours, theirs = model.merge_and_unload(), ref.merge_and_unload()
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **fp_tol(torch.float32, 4 + 32), msg=n)  # r-term products, other order


def test_two_active_adapters_add_their_updates() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    model = peftkit.get_peft_model(nn.Sequential(base), peftkit.DeloraConfig(
        r=2, target_modules=["0"], init_weights=False))
    model.add_adapter("other", peftkit.DeloraConfig(r=3, delora_lambda=2, target_modules=["0"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    layer = _layers(model)[0]
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = base(x) + x @ (layer.get_delta_weight("default") + layer.get_delta_weight("other")).T
        torch.testing.assert_close(model(x), expected, **fp_tol(torch.float32, 8 + 3))


# ------------------------------------------------------------------------------------------------ mixed batches


def test_mixed_batch_rows_match_single_adapter_runs_unlike_the_reference(tmp_path) -> None:
    """Reference trap: its DeLoRA layers ignore ``adapter_names`` (no per-row routing: ``PeftModel.forward`` drops
    the argument), so every row silently gets the active adapter; peftkit routes each row to its own adapter."""
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA, r=4)).eval()
    perturb_adapter(model, MARKERS, seed=3)
    model.add_adapter("other", _config(peftkit, LLAMA, r=2, delora_lambda=3))
    perturb_adapter(model, ("delora_A.other", "delora_B.other"), seed=4)
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["other", "__base__", "default"]
    mixed = check_mixed_batch_rows(model, {"input_ids": ids}, names, TOL)
    model.save_pretrained(str(tmp_path))
    ref = peft.PeftModel.from_pretrained(case_model(LLAMA), str(tmp_path)).eval()
    ref.load_adapter(str(tmp_path / "other"), adapter_name="other")
    with torch.no_grad():
        theirs = ref(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(theirs[2:], mixed[2:], **TOL)  # the active adapter's row agrees
    assert not torch.allclose(theirs[:2], mixed[:2], **TOL)  # the others got "default" there


# ------------------------------------------------------------------------------------------------ memory


def test_autograd_keeps_no_input_or_output_sized_temporary() -> None:
    """The reference keeps ``x * w_norm`` (input-sized) for backward and adds through an output-sized zero buffer;
    peftkit keeps only the input ``x`` and ``(N, r)`` hiddens (the update goes into the base output in place)."""
    torch.manual_seed(0)
    base = nn.Linear(64, 128, bias=False).requires_grad_(False)
    layer = _layers(peftkit.get_peft_model(nn.Sequential(base), peftkit.DeloraConfig(
        r=4, target_modules=["0"], init_weights=False)))[0]
    x = torch.randn(32, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    # beside the frozen weight (kept for the input's gradient) only x itself is input- or output-sized
    skip = {base.weight.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}
    big = [tuple(t.shape) for t in saved if t.numel() >= 32 * 64 and t.untyped_storage().data_ptr() not in skip]
    assert not big, big
    assert layer.delora_A["default"].grad is not None and layer.delora_lambda["default"].grad is not None


# ------------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(("kwargs", "field", "reference_raises"), [
    ({"r": 0}, "r", True),
    ({"r": -2}, "r", True),
    ({"target_modules": "q_proj", "layers_to_transform": [0]}, "layers_to_transform", True),
    ({"layers_pattern": "layers"}, "layers_pattern", True),
    ({"bias": "lora"}, "bias", False),  # the reference raises NotImplementedError while injecting
    ({"module_dropout": 1.5}, "module_dropout", False),  # the reference fails in nn.Dropout while injecting
    ({"delora_lambda": "big"}, "delora_lambda", False),  # the reference fails in float() while injecting
    ({"init_weights": "yes"}, "init_weights", False),  # the reference treats any truthy value as True
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern", False),
    ({"lambda_pattern": {"q_proj": None}}, "lambda_pattern", False),
])
def test_bad_config_values_raise_typed_errors_naming_the_field(kwargs: dict, field: str,
                                                                reference_raises: bool) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        peftkit.DeloraConfig(**kwargs)
    assert isinstance(info.value, ValueError)  # the reference raises ValueError where it checks
    if reference_raises:
        with pytest.raises(ValueError):
            peft.DeloraConfig(**kwargs)


@pytest.mark.parametrize("case_name", ["custom-conv2d", "custom-emb"])
def test_non_linear_targets_are_refused_as_the_reference(case_name: str) -> None:
    with pytest.raises(UnsupportedModuleError, match="DeLoRA supports torch.nn.Linear") as info:
        peftkit.get_peft_model(case_model(case_name), _config(peftkit, case_name))
    assert isinstance(info.value, TypeError)
    with pytest.raises(TypeError):
        peft.get_peft_model(case_model(case_name), _config(peft, case_name))


def test_inspect_measures_the_update_from_the_file(tmp_path) -> None:
    from peftkit.cli.inspect_cmd import inspect_adapter

    model = peftkit.get_peft_model(case_model("custom-mlp"), _config(peftkit, "custom-mlp", r=2))
    perturb_adapter(model, MARKERS, seed=3)
    model.save_pretrained(str(tmp_path))
    delta = _layers(model)[0].get_delta_weight("default").detach()
    (info,) = inspect_adapter(str(tmp_path))["layers"]
    assert info["shape"] == [20, 10] and info["rank"] == 2
    assert math.isclose(info["norm"], float(delta.norm()), rel_tol=1e-5)


def test_mixed_model_refuses_delora_as_the_reference() -> None:
    with pytest.raises(ConfigError, match="DELORA"):
        peftkit.get_peft_model(case_model("custom-mlp"), _config(peftkit, "custom-mlp"), mixed=True)
    with pytest.raises(ValueError, match="DELORA"):
        peft.get_peft_model(case_model("custom-mlp"), _config(peft, "custom-mlp"), mixed=True)


def test_default_targets_are_the_references() -> None:
    ours = peftkit.get_peft_model(case_model(LLAMA), peftkit.DeloraConfig(task_type="CAUSAL_LM"))
    ref = peft.get_peft_model(case_model(LLAMA), peft.DeloraConfig(task_type="CAUSAL_LM"))
    assert ours.peft_config["default"].target_modules == set(ref.peft_config["default"].target_modules)
    assert set(peftkit.get_peft_model_state_dict(ours)) == set(peft.get_peft_model_state_dict(ref))
