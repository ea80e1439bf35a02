"""C3A (``C3AConfig``): the block-circulant update against a plain implementation of the paper's formula, the FFT
forward/backward against dense autograd and the reference's ``BlockCircularConvolution``, interop with the
reference both ways (tiny Llama, BERT, T5, a custom MLP), merge/unmerge, several adapters, mixed batches, the
reference's initialisations, typed config errors.

The generic properties (identity, save/load, multi-adapter, errors) also come from the conformance suite.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
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
from numerics import TINY_MODEL_REDUCTION, fp_tol
from torch import nn

import peftkit
from peftkit import C3AConfig, get_peft_model
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.c3a import C3ALayer, default_c3a_targets
from peftkit.methods.c3a.circulant import _CirculantApply, circulant_apply, circulant_apply_plain

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")

#: issue 22: interop outputs within 1e-5
INTEROP_TOL = {"atol": 1e-5, "rtol": 1e-5}
#: the same model through another code path: a few ulp per term of the tiny models' longest reductions
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)


# ------------------------------------------------------------------------------------------------ plain reference
def plain_delta(kernel: torch.Tensor) -> torch.Tensor:
    """``ΔW: (M b, N b)`` in float64, written out cell by cell from the paper's block-circulant definition: block
    ``(m, n)`` is the circulant matrix whose row ``k`` is ``kernel[m, n]`` rotated right by ``k``, over ``in``."""
    m_blocks, n_blocks, b = kernel.shape
    k64 = kernel.detach().double()
    delta = torch.zeros(m_blocks * b, n_blocks * b, dtype=torch.float64)
    for m in range(m_blocks):
        for n in range(n_blocks):
            for row in range(b):
                for col in range(b):
                    delta[m * b + row, n * b + col] = k64[m, n, (col - row) % b]
    return delta / (n_blocks * b)


def _layers(model: nn.Module) -> list[C3ALayer]:
    return [m for m in model.modules() if isinstance(m, C3ALayer)]


@pytest.mark.parametrize(("out", "inp", "block"), [(12, 8, 4), (6, 9, 3), (8, 8, 8), (5, 10, 5), (6, 4, 1)])
def test_layer_output_is_base_plus_plain_block_circulant_update(out: int, inp: int, block: int) -> None:
    """Even and odd block sizes (the Nyquist bin), ``M != N``, one block, block size 1."""
    torch.manual_seed(0)
    base = nn.Linear(inp, out)
    model = get_peft_model(nn.Sequential(base), C3AConfig(block_size=block, init_weights="gaussian",
                                                          target_modules=["0"]))
    layer = _layers(model)[0]
    kernel = layer.c3a_kernel["default"]
    assert kernel.shape == (out // block, inp // block, block) and kernel.dtype == torch.float32
    delta = plain_delta(kernel)
    x = torch.randn(3, 4, inp)
    expected = x.double() @ (base.weight.double() + delta).T + base.bias.double()
    # float32 FFTs of b points and an N-block sum, against a float64 matmul of in terms
    torch.testing.assert_close(layer(x).double(), expected, **fp_tol(torch.float32, inp + out))
    torch.testing.assert_close(layer.get_delta_weight("default").double(), delta, **fp_tol(torch.float32, 4))


@pytest.mark.parametrize(("out", "inp", "block"), [(12, 8, 4), (6, 9, 3), (8, 8, 8)])
def test_fft_forward_and_backward_match_dense_autograd(out: int, inp: int, block: int) -> None:
    """The hand-written backward (gradcheck) and the plain-autograd FFT path against ``x @ ΔWᵀ`` with the dense
    plain ``ΔW``, in float64 (values, input and kernel gradients)."""
    gen = torch.Generator().manual_seed(out + inp)
    kernel = torch.randn(out // block, inp // block, block, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, inp, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, out, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, k: _CirculantApply.apply(x, k, 1.0 / inp), (x, kernel))
    b = block
    idx = (torch.arange(b)[None, :] - torch.arange(b)[:, None]) % b
    dense = kernel[:, :, idx].permute(0, 2, 1, 3).reshape(out, inp) / inp  # differentiable plain ΔW
    expected = [x @ dense.T]
    expected += torch.autograd.grad(expected[0], (x, kernel), g)
    for fn in (lambda: _CirculantApply.apply(x, kernel, 1.0 / inp), lambda: circulant_apply_plain(x, kernel, 1.0 / inp)):
        y = fn()
        for a, e in zip((y, *torch.autograd.grad(y, (x, kernel), g)), expected):
            torch.testing.assert_close(a, e, **fp_tol(torch.float64, inp * 7))


def test_update_and_kernel_gradient_match_the_references_block_circular_convolution() -> None:
    """Values, kernel gradients and the dense ``ΔW`` equal the reference's. Its input gradient is wrong (it
    convolves the time-reversed output gradient; README): ours equals dense autograd, the reference's does not."""
    from peft.tuners.c3a.utils import BlockCircularConvolution, get_circulant_fast

    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(3, 2, 8, generator=gen, requires_grad=True)
    x = torch.randn(5, 16, generator=gen, requires_grad=True)
    g = torch.randn(5, 24, generator=gen)
    ours = circulant_apply(x, kernel, 1.0 / 16)
    ref = BlockCircularConvolution.apply(x, kernel) / 16
    (ours_dx, ours_dk), (ref_dx, ref_dk) = (torch.autograd.grad(y, (x, kernel), g) for y in (ours, ref))
    tol = fp_tol(torch.float32, 5 * 24)  # float32 FFTs of 8 points and sums over 5 rows / 3 blocks
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(ours_dk, ref_dk, **tol)
    dense = plain_delta(kernel).float()
    torch.testing.assert_close(ours_dx, g @ dense, **tol)  # d(x ΔWᵀ)/dx applied to g
    assert not torch.allclose(ref_dx, g @ dense, atol=1e-2)
    torch.testing.assert_close(plain_delta(kernel), get_circulant_fast(kernel.detach()).double() / 16,
                               **fp_tol(torch.float32, 16))


def test_model_gradients_equal_plain_autograd_unlike_the_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole-model kernel gradients (tiny Llama, C3A on every layer) equal those of plain autograd through the FFTs.
    The reference's wrong input gradient reaches every kernel below the top adapted layer: with the same kernels,
    its layer-0 gradients are 30-100% of their size off (the top layer's agree: nothing adapted lies above it)."""
    from peftkit.methods.c3a import circulant

    kw = {"block_size": 8, "init_weights": "gaussian", "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    inputs = interop_case("llama-causal").make_inputs(2)

    def kernel_grads(model: nn.Module) -> dict[str, torch.Tensor]:
        model(**inputs).loss.backward()
        return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if "c3a_kernel" in n}

    ours_model = get_peft_model(case_model("llama-causal"), C3AConfig(**kw))
    ref_model = peft.get_peft_model(case_model("llama-causal"), peft.C3AConfig(**kw))
    ref_model.load_state_dict(ours_model.state_dict(), strict=False)
    ours, ref = kernel_grads(ours_model), kernel_grads(ref_model)
    monkeypatch.setattr(circulant._CirculantApply, "apply", circulant_apply_plain)
    ours_model.zero_grad()
    plain = kernel_grads(ours_model)
    # gradients are ~1e-4 here: compare them relative to their largest entry (float32 over the model's reductions)
    for name, grad in ours.items():
        scale = plain[name].abs().max()
        torch.testing.assert_close(grad / scale, plain[name] / scale, **TOL)
    lower = [n for n in ours if "layers.0." in n]
    assert lower and all((ours[n] - ref[n]).abs().max() > 0.1 * ours[n].abs().max() for n in lower)
    for name in set(ours) - set(lower):  # the top layer: nothing adapted above it, the reference agrees
        torch.testing.assert_close(ours[name] / ours[name].abs().max(), ref[name] / ours[name].abs().max(), **TOL)


def test_backward_keeps_only_the_input_and_the_kernel() -> None:
    """The reference keeps ``x`` and the kernel too; plain autograd through the FFTs would keep ``rfft(x)``."""
    base = nn.Linear(64, 32, bias=False).requires_grad_(False)
    layer = _layers(get_peft_model(nn.Sequential(base), C3AConfig(block_size=16, target_modules=["0"])))[0]
    x = torch.randn(4, 64, requires_grad=True)
    kernel = layer.c3a_kernel["default"]
    owners = {t.untyped_storage().data_ptr(): name for name, t in (("x", x), ("W", base.weight), ("kernel", kernel))}
    kept: list[str] = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: kept.append(owners.get(t.untyped_storage().data_ptr(), str(tuple(t.shape)))) or t, lambda t: t):
        layer(x).sum().backward()
    assert sorted(kept) == ["W", "kernel", "x"]  # frozen base matmul: W; C3A: x itself and the kernel


# ------------------------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize(("init", "bound"), [("xavier_uniform", math.sqrt(6 / (64 + 32))), (False, math.sqrt(6 / 96)),
                                             ("kaiming_uniform", math.sqrt(1 / 64)), ("gaussian", None), (True, 0.0)])
def test_initialisations_are_the_references(init: bool | str, bound: float | None) -> None:
    torch.manual_seed(0)
    kernel = _layers(get_peft_model(nn.Sequential(nn.Linear(64, 32)), C3AConfig(
        block_size=8, init_weights=init, target_modules=["0"])))[0].c3a_kernel["default"].detach()
    if bound is None:  # N(0, 1): 256 draws
        assert abs(kernel.mean()) < 0.25 and 0.8 < kernel.std() < 1.2
    elif bound == 0.0:
        assert torch.count_nonzero(kernel) == 0
    else:
        assert kernel.abs().max() <= bound and kernel.abs().max() > 0.8 * bound


def test_init_weights_true_is_exact_identity_and_default_is_not() -> None:
    model = case_model("llama-causal")
    case = interop_case("llama-causal")
    base = case_output(model, case)
    ident = get_peft_model(case_model("llama-causal"), C3AConfig(block_size=8, init_weights=True,
                                                                  target_modules=["q_proj", "v_proj"]))
    assert torch.equal(case_output(ident, case), base)  # exact: a zero kernel adds irfft(0) = exact zeros, same kernels
    changed = get_peft_model(case_model("llama-causal"), C3AConfig(block_size=8, target_modules=["q_proj", "v_proj"]))
    assert not torch.allclose(case_output(changed, case), base, atol=1e-4)


def test_half_precision_base_keeps_a_float32_kernel() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = _layers(get_peft_model(nn.Sequential(base), C3AConfig(block_size=4, init_weights="gaussian",
                                                                  target_modules=["0"])))[0]
    assert layer.c3a_kernel["default"].dtype == torch.float32
    x = torch.randn(3, 16).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + x.float() @ plain_delta(layer.c3a_kernel["default"]).float().T
    torch.testing.assert_close(y.float(), expected, **fp_tol(torch.bfloat16, 16))


# ------------------------------------------------------------------------------------------------ interop
INTEROP = [
    pytest.param("llama-causal", {"block_size": 8}, id="llama"),
    pytest.param("llama-causal", {"block_size": 16, "block_size_pattern": {"v_proj": 4}, "init_weights": "gaussian"},
                 id="llama-pattern"),
    pytest.param("bert-feat", {"block_size": 32, "init_weights": "kaiming_uniform", "bias": "c3a_only"}, id="bert"),
    pytest.param("t5-seq2seq", {"block_size": 8}, id="t5"),
    pytest.param("custom-mlp", {"block_size": 5, "target_modules": ["lin0"]}, id="mlp"),
    pytest.param("custom-mlp", {"block_size": 2, "target_modules": ["lin0", "lin1"]}, id="mlp-both"),
]
ESSENTIALS = ("block_size", "block_size_pattern", "init_weights", "bias", "layers_to_transform", "layers_pattern")


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Perturbed kernels: the saved files have the same keys, shapes, dtypes and config essentials, and each
    library loads the other's file with the saver's outputs (1e-5)."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, **kwargs}
    check_interop_both_ways(case, lambda lib: lib.C3AConfig(**kw), tmp_path, markers=("c3a_",), essentials=ESSENTIALS,
                            tol=INTEROP_TOL)


def test_merge_matches_the_references_merge() -> None:
    """The same kernel merged by both libraries gives the same weights (ours by a gather, the reference's by FFTs)."""
    kw = {"block_size": 8, "init_weights": "gaussian", "target_modules": ["q_proj", "v_proj"]}
    ours = get_peft_model(case_model("llama-causal"), C3AConfig(**kw))
    ref = peft.get_peft_model(case_model("llama-causal"), peft.C3AConfig(**kw))
    ref.load_state_dict(ours.state_dict(), strict=False)  # same in-memory names: base_layer + c3a_kernel.default
    merged_ours = dict(ours.merge_and_unload().named_parameters())
    merged_ref = dict(ref.merge_and_unload().named_parameters())
    assert merged_ours.keys() == merged_ref.keys()
    for name, value in merged_ours.items():
        torch.testing.assert_close(value, merged_ref[name], **fp_tol(torch.float32, 32))  # 32-point FFTs


# ------------------------------------------------------------------------------------------------ merging, adapters
def test_merge_unmerge_and_merge_and_unload_match_unmerged_outputs() -> None:
    case = interop_case("llama-causal")
    model = get_peft_model(case_model("llama-causal"), C3AConfig(block_size=8, target_modules=["q_proj", "v_proj"]))
    perturb_adapter(model, ("c3a_",), seed=1)
    model.eval()
    expected = case_output(model, case)
    model.merge_adapter()
    torch.testing.assert_close(case_output(model, case), expected, **TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(case_output(model, case), expected, **TOL)
    torch.testing.assert_close(case_output(model.merge_and_unload(), case), expected, **TOL)


def test_two_active_adapters_each_add_their_update_of_the_input() -> None:
    """The reference feeds the first adapter's update into the second (and fails for different block sizes);
    here each adapter adds ``x ΔWᵀ`` of the layer's input, as LoRA and the merged model do."""
    torch.manual_seed(0)
    base = nn.Linear(8, 12, bias=False)
    model = get_peft_model(nn.Sequential(base), C3AConfig(block_size=4, init_weights="gaussian", target_modules=["0"]))
    model.add_adapter("b", C3AConfig(block_size=2, init_weights="gaussian", target_modules=["0"]))
    model.base_model.set_adapter(["default", "b"])
    layer = _layers(model)[0]
    deltas = [plain_delta(layer.c3a_kernel[name]) for name in ("default", "b")]
    x = torch.randn(4, 8)
    expected = x.double() @ (base.weight.double() + deltas[0] + deltas[1]).T
    torch.testing.assert_close(layer(x).double(), expected, **fp_tol(torch.float32, 8 * 12))
    layer.merge()
    torch.testing.assert_close(layer(x).double(), expected, **fp_tol(torch.float32, 8 * 12))


def test_mixed_batch_rows_match_single_adapter_runs() -> None:
    kw = {"block_size": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    model = get_peft_model(case_model("llama-causal"), C3AConfig(**kw)).eval()
    model.add_adapter("other", C3AConfig(**{**kw, "block_size": 4}))
    perturb_adapter(model, ("c3a_",), seed=4)
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    check_mixed_batch_rows(model, {"input_ids": ids}, ["other", "__base__", "default"], TOL)


def test_training_step_updates_only_the_kernel() -> None:
    model = get_peft_model(case_model("llama-causal"), C3AConfig(block_size=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("c3a_kernel" in n for n in trainable)
    out = model(**interop_case("llama-causal").make_inputs(2))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)


def test_inspect_strength_is_the_dense_frobenius_norm() -> None:
    from peftkit.methods.c3a import C3A

    kernel = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0))
    shape, rank, strength, _ = C3A.update_strength({"c3a_kernel": kernel}, {})
    assert shape == [12, 8] and rank is None
    assert math.isclose(strength, float(plain_delta(kernel).norm()), rel_tol=1e-9)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"block_size": 0}, "block_size"),
    ({"block_size": 2.0}, "block_size"),
    ({"bias": "some"}, "bias"),
    ({"init_weights": "orthogonal"}, "init_weights"),
    ({"init_weights": None}, "init_weights"),
    ({"block_size_pattern": {"q_proj": 0}}, "block_size_pattern"),
    ({"block_size_pattern": ["q_proj"]}, "block_size_pattern"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"target_modules": ".*q_proj", "layers_pattern": "layers"}, "layers_pattern"),
])
def test_bad_config_values_raise_config_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        C3AConfig(**kwargs)
    assert isinstance(info.value, ValueError)  # the reference raises ValueError (where it checks at all)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"block_size": 3}, "block_size"),
    ({"block_size": 8, "block_size_pattern": {"lin0": 3}}, "block_size_pattern"),
])
def test_block_size_not_dividing_the_features_raises_naming_the_field(kwargs: dict, field: str) -> None:
    model = nn.Sequential()
    model.add_module("lin0", nn.Linear(16, 8))
    model.add_module("lin1", nn.Linear(8, 8))
    target = ["lin0"] if field == "block_size" else ["lin0", "lin1"]
    with pytest.raises(ConfigError, match=field) as info:
        get_peft_model(model, C3AConfig(target_modules=target, **kwargs))
    assert isinstance(info.value, ValueError) and "in_features" in str(info.value)


def test_pattern_block_size_applies_per_layer() -> None:
    model = get_peft_model(case_model("llama-causal"), C3AConfig(block_size=16, block_size_pattern={"v_proj": 4},
                                                                  target_modules=["q_proj", "v_proj"]))
    sizes = {n.rsplit(".", 1)[-1]: m.block_size["default"] for n, m in model.named_modules() if isinstance(m, C3ALayer)}
    assert sizes == {"q_proj": 16, "v_proj": 4}


def test_unsupported_module_raises_typed_error() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3))
    with pytest.raises(UnsupportedModuleError, match="nn.Linear"):
        get_peft_model(model, C3AConfig(block_size=2, target_modules=["0"]))


def test_default_targets_are_the_reference_table() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING as TABLE

    for model_type, targets in TABLE.items():
        assert set(default_c3a_targets(model_type)) == set(targets), model_type
    assert peftkit.C3AModel is not None
