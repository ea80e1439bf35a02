"""OFT (issue 21): math against a plain implementation, interop both ways with the reference (🤗 PEFT 0.21.2),
merge/unmerge, the reference's traps peftkit fixes, and typed config errors.

Math of one adapted ``W: (out, in)``: ``in = r·b``; each block ``i`` stores the strict upper triangle of ``U_i`` and
``Q_i = U_i - U_iᵀ``; ``R_i = (I - Q_i)(I + Q_i)⁻¹`` (Cayley) or the Neumann series; ``y = (x @ blockdiag(R)) Wᵀ + c``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import pytest
import torch
from method_interop import LinNet, case_output, check_interop_both_ways, interop_case, quantized_linear
from models import MLP, TaskCase, _seeded_build, seq_cls_inputs, tiny_bert
from numerics import TINY_MODEL_REDUCTION, fp_tol
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.oft import OFTLayer
from peftkit.methods.oft.rotation import block_rotate, block_rotate_reference

peft = pytest.importorskip("peft")

#: float32; longest reduction: the tiny models' matmuls plus a block of the rotation per adapted layer
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)


# ------------------------------------------------------------------------------------------------ plain math
def plain_blocks(vec: torch.Tensor, b: int, neumann: bool, terms: int) -> torch.Tensor:
    """``(n, b(b-1)/2) -> (n, b, b)`` with loops and a matrix inverse (no peftkit helper)."""
    out = []
    for row in vec.double():
        u = torch.zeros(b, b, dtype=torch.float64)
        k = 0
        for i in range(b):
            for j in range(i + 1, b):
                u[i, j] = row[k]
                k += 1
        q = u - u.T
        eye = torch.eye(b, dtype=torch.float64)
        if not neumann:
            out.append((eye - q) @ torch.linalg.inv(eye + q))
            continue
        # the reference's series: I + 2Q + 2Q^2 + ... + 2Q^(t-2) + Q^max(3, t-1)   (t > 2)
        r = eye + 2 * q if terms > 1 else eye.clone()
        if terms > 2:
            last = max(3, terms - 1)
            for p in range(2, last):
                r = r + 2 * torch.linalg.matrix_power(q, p)
            r = r + torch.linalg.matrix_power(q, last)
        out.append(r)
    return torch.stack(out)


class Wide(nn.Module):
    """x: (B, 5, 12) -> (B, 5, 6) through one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("neumann,terms", [(False, 5), (True, 2), (True, 3), (True, 4), (True, 5), (True, 7)])
@pytest.mark.parametrize("block_share", [False, True])
def test_linear_matches_plain_formula(neumann: bool, terms: int, block_share: bool) -> None:
    torch.manual_seed(0)
    model = peftkit.get_peft_model(Wide(), peftkit.OFTConfig(
        target_modules=["lin"], oft_block_size=4, init_weights=False, use_cayley_neumann=neumann,
        num_cayley_neumann_terms=terms, block_share=block_share)).eval()
    layer = model.base_model.model.lin
    vec = layer.oft_R["default"].weight.detach()
    assert vec.shape == ((1 if block_share else 3), 6)
    blocks = plain_blocks(vec, 4, neumann, terms).expand(3, 4, 4)
    x = torch.randn(2, 5, 12)
    w, c = layer.get_base_layer().weight.double(), layer.get_base_layer().bias.double()
    expected = (x.double() @ torch.block_diag(*blocks)) @ w.T + c
    torch.testing.assert_close(model(x).double(), expected, **fp_tol(torch.float32, 12 + 4))


def test_coft_projects_into_the_eps_ball() -> None:
    """COFT: each block's ``Q`` ends within Frobenius norm ``eps / sqrt(r)`` (direction kept)."""
    torch.manual_seed(0)
    eps = 1e-2
    model = peftkit.get_peft_model(Wide(), peftkit.OFTConfig(
        target_modules=["lin"], oft_block_size=4, init_weights=False, coft=True, eps=eps))
    layer = model.base_model.model.lin
    before = layer.oft_R["default"].weight.detach().clone()
    model(torch.randn(1, 5, 12))
    after = layer.oft_R["default"].weight.detach()
    # ||Q||_F = sqrt(2) * ||upper||; radius eps / sqrt(3 blocks)
    radius = eps / 3 ** 0.5
    norms = 2 ** 0.5 * after.double().norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, radius), rtol=1e-5, atol=0)
    cos = torch.nn.functional.cosine_similarity(before, after, dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=1e-5, atol=1e-5)


def test_block_rotate_matches_dense_reference_values_and_grads() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 3, 12, requires_grad=True)
    blocks = torch.randn(3, 4, 4, requires_grad=True)
    fast = block_rotate(x, blocks)
    (g_x, g_b) = torch.autograd.grad((fast * torch.arange(12.0)).sum(), (x, blocks))
    slow = block_rotate_reference(x, blocks)
    (r_x, r_b) = torch.autograd.grad((slow * torch.arange(12.0)).sum(), (x, blocks))
    tol = fp_tol(torch.float32, 21)  # reductions over b=4 (values) and 21 rows (block grads)
    torch.testing.assert_close(fast, slow, **tol)
    torch.testing.assert_close(g_x, r_x, **tol)
    torch.testing.assert_close(g_b, r_b, **tol)


# ------------------------------------------------------------------------------------------------ interop
class Conv1x1(nn.Module):
    """x: (B, 8, 5, 5) -> (B, 6, 5, 5): a 1x1 Conv2d (the reference's unmerged conv forward is exact for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def _tensor(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def _bert_inputs(batch_size: int) -> dict:
    return {**seq_cls_inputs(batch_size), "output_hidden_states": True}


def _conv_inputs(batch_size: int) -> dict:
    return {"x": _tensor(batch_size, 8, 5, 5)}


#: name -> (model case, target_modules, extra config, output of a model call (None: the case's output_key))
CASES: dict[str, tuple[TaskCase, list[str], dict, Callable | None]] = {
    "llama": (interop_case("llama-causal"), ["q_proj", "v_proj", "down_proj"], {"oft_block_size": 8}, None),
    # BERT's classifier logits are ~1e-2: compare the last hidden state, where the rotation shows clearly
    "bert": (TaskCase("bert-seqcls-hidden", "SEQ_CLS", lambda: tiny_bert("SEQ_CLS"), _bert_inputs),
             ["query", "value"], {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False},
             lambda out: out.hidden_states[-1]),
    "mlp": (interop_case("custom-mlp"), ["lin0", "lin1"], {"oft_block_size": 4}, None),
    "emb": (interop_case("custom-emb"), ["emb", "lin0"], {"oft_block_size": 4, "block_share": True}, None),
    "conv1x1": (TaskCase("conv1x1", None, _seeded_build(Conv1x1), _conv_inputs, output_key=None), ["conv", "head"],
                {"oft_block_size": 2, "coft": True, "eps": 0.05}, None),
}


def _config(lib, name: str) -> object:
    _, targets, extra, _ = CASES[name]
    task = "SEQ_CLS" if name == "bert" else None
    return lib.OFTConfig(target_modules=targets, init_weights=False, task_type=task, **extra)


def _base(name: str) -> nn.Module:
    return CASES[name][0].build().eval()


def _output(model: nn.Module, name: str) -> torch.Tensor:
    case, _, _, pick = CASES[name]
    return case_output(model, case, output=pick)


def _build(lib, name: str, seed: int = 0) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # block sizes fitted to the layers warn, as in the reference
        torch.manual_seed(seed)
        return lib.get_peft_model(_base(name), _config(lib, name)).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_interop_both_ways(name: str, tmp_path) -> None:
    """Random (non-identity) adapters: each library loads the other's file with the saver's outputs (1e-5), with the
    same saved keys, shapes and dtypes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # block sizes fitted to the layers warn, as in the reference
        check_interop_both_ways(CASES[name][0], lambda lib: _config(lib, name), tmp_path, markers=None,
                                output=CASES[name][3], min_change=1e-3)


@pytest.mark.parametrize("name", ["llama", "conv1x1"])
def test_saved_config_matches_reference(name: str, tmp_path) -> None:
    _build(peftkit, name).save_pretrained(tmp_path / "a")
    _build(peft, name).save_pretrained(tmp_path / "b")
    ours = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    ref = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert set(ours) == set(ref)
    for key in ("peft_type", "r", "oft_block_size", "coft", "eps", "block_share", "use_cayley_neumann",
                "num_cayley_neumann_terms", "module_dropout", "bias", "init_weights"):
        assert ours[key] == ref[key], key


def test_conv3x3_forward_is_the_merged_layer_and_identity_at_init(tmp_path) -> None:
    """The reference's unmerged conv forward unfolds and re-folds the input (summing overlapping patches), so it is
    neither identity at init nor equal to its own merged layer for kernels > 1; peftkit computes the merged layer's
    output, which the reference's merged model reproduces from the same file."""
    from models import Conv2dModel

    base = _seeded_build(Conv2dModel)
    x = _tensor(2, 3, 8, 8)
    fresh = peftkit.get_peft_model(base(), peftkit.OFTConfig(target_modules=["conv"], oft_block_size=3)).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), base().eval()(x), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    ours = peftkit.get_peft_model(base(), peftkit.OFTConfig(target_modules=["conv"], oft_block_size=3,
                                                            init_weights=False)).eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path).eval()
    theirs.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **fp_tol(torch.float32, 27 + 512))


# ------------------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("name", ["llama", "emb", "conv1x1", "bert"])
def test_merge_unmerge_and_unload_match_unmerged(name: str) -> None:
    model = _build(peftkit, name)
    expected = _output(model, name)
    model.merge_adapter()
    torch.testing.assert_close(_output(model, name), expected, **TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(_output(model, name), expected, **TOL)
    with model.disable_adapter():
        torch.testing.assert_close(_output(model, name), _output(_base(name), name), **TOL)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, OFTLayer) for m in merged.modules())
    torch.testing.assert_close(_output(merged, name), expected, **TOL)


def test_merged_weight_equals_reference_merge() -> None:
    ours, theirs = _build(peftkit, "mlp"), _build(peft, "mlp")
    peft.set_peft_model_state_dict(theirs, peftkit.get_peft_model_state_dict(ours))
    a = ours.merge_and_unload().lin1.weight
    b = theirs.merge_and_unload().lin1.weight
    torch.testing.assert_close(a, b, **fp_tol(torch.float32, 20))


# ------------------------------------------------------------------------------------------------ traps fixed
def test_module_dropout_one_makes_every_block_identity_in_training() -> None:
    """The reference builds a dropout layer for ``module_dropout`` but never calls it (training ignores it);
    peftkit replaces ``int(p·r)`` random blocks by the identity in training, so p = 1 gives the base output."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12)
    base = Wide()
    with torch.no_grad():
        expected = base(x)
    model = peftkit.get_peft_model(base, peftkit.OFTConfig(target_modules=["lin"], oft_block_size=4,
                                                          init_weights=False, module_dropout=1.0))
    model.train()
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    model.eval()
    with torch.no_grad():
        assert (model(x) - expected).abs().max() > 1e-3


def test_block_size_fitted_to_layer_with_reference_warning() -> None:
    with pytest.warns(UserWarning, match=r"Adjusted `oft_block_size` to \(5\)"):
        model = peftkit.get_peft_model(_seeded_build(MLP)(), peftkit.OFTConfig(target_modules=["lin0"],
                                                                              oft_block_size=4))
    layer = model.base_model.model.lin0
    assert (layer.r["default"], layer.oft_block_size["default"]) == (2, 5)
    assert layer.oft_R["default"].weight.shape == (2, 10)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,field", [
    ({"r": 0, "oft_block_size": 0}, "r"),
    ({"r": 4, "oft_block_size": 8}, "r"),
    ({"r": -1, "oft_block_size": 0}, "r"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"bias": "lora_only"}, "bias"),
    ({"module_dropout": 1.5}, "module_dropout"),
    ({"coft": "yes"}, "coft"),
    ({"num_cayley_neumann_terms": 2.5}, "num_cayley_neumann_terms"),
])
def test_bad_config_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        peftkit.OFTConfig(target_modules=["lin"], **kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_pre_014_checkpoint_refused() -> None:
    with pytest.raises(ValueError, match="OFT has been updated since PEFT 0.14.0"):
        peftkit.OFTConfig.check_kwargs(r=8, peft_type="OFT")


def test_unsupported_module_refused() -> None:
    class Gru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(4, 4)

    with pytest.raises(UnsupportedModuleError, match="OFT supports"):
        peftkit.get_peft_model(Gru(), peftkit.OFTConfig(target_modules=["gru"]))


@pytest.mark.parametrize("conv", [
    nn.Conv1d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, (3, 1), padding=1, dilation=2),
    nn.Conv2d(4, 6, 3, padding=1, groups=2),
    nn.Conv3d(4, 2, 1),
], ids=["conv1d", "conv2d-nonsquare-dilated", "conv2d-groups", "conv3d"])
def test_other_convolutions_identity_at_init_and_merge(conv: nn.Module) -> None:
    """Convolutions the reference refuses (Conv1d/3d, dilation) or cannot merge (groups, non-square kernels):
    the rotated-filter forward is identity at init and equals its own merged layer."""
    x = _tensor(2, 4, *([5] * (conv.weight.dim() - 2)))
    model = nn.Sequential(conv)
    with torch.no_grad():
        base = model(x)
    fresh = peftkit.get_peft_model(model, peftkit.OFTConfig(target_modules=["0"], r=1, oft_block_size=0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), base, atol=1e-6, rtol=0)
    fresh.unload()
    torch.manual_seed(0)
    adapted = peftkit.get_peft_model(model, peftkit.OFTConfig(target_modules=["0"], r=1, oft_block_size=0,
                                                              init_weights=False)).eval()
    with torch.no_grad():
        out = adapted(x)
        assert (out - base).abs().max() > 1e-3
        adapted.merge_adapter()
        torch.testing.assert_close(adapted(x), out, **fp_tol(torch.float32, conv.weight[0].numel()))


# ------------------------------------------------------------------------------------------------ quantized bases
def _check_quantized_interop(model: nn.Module, dense: nn.Linear, variant: str, x: torch.Tensor,
                             unmerged: torch.Tensor, tmp_path) -> None:
    """peftkit's file in the reference and the reference's file in peftkit give the same outputs."""
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(LinNet(quantized_linear(variant, dense)), tmp_path).train()  # same kernels
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), unmerged, atol=2e-4, rtol=0)  # same quantized kernel, other order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(2)
        ref = peft.get_peft_model(LinNet(quantized_linear(variant, dense)), peft.OFTConfig(
            target_modules=["lin"], oft_block_size=16, init_weights=False))
    ref.save_pretrained(tmp_path / "ref")
    ours = peftkit.PeftModel.from_pretrained(LinNet(quantized_linear(variant, dense)), tmp_path / "ref").train()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=2e-4, rtol=0)


@pytest.mark.parametrize("variant", ["8bit", "nf4", "torchao-int8"])
def test_quantized_linear_trains_merges_and_interops(variant: str, tmp_path) -> None:
    """bitsandbytes on CPU: identity at init, only ``oft_R`` trains, the reference computes the same outputs from
    peftkit's file, and merging (dequantize, rotate, re-quantize) stays within a few quantization errors."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    base = LinNet(quantized_linear(variant, dense))
    with torch.no_grad():  # train mode throughout: bitsandbytes picks other kernels in eval mode
        expected = base(x)
        quant_error = (expected - dense(x)).abs().max().item()
    fresh = peftkit.get_peft_model(base, peftkit.OFTConfig(target_modules=["lin"], oft_block_size=16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=1e-6, rtol=0)
    torch.manual_seed(1)
    model = peftkit.get_peft_model(LinNet(quantized_linear(variant, dense)), peftkit.OFTConfig(
        target_modules=["lin"], oft_block_size=16, init_weights=False))
    model(x).pow(2).mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("oft_R" in n for n in trainable)
    with torch.no_grad():
        unmerged = model(x)
    if variant != "torchao-int8":  # the reference needs a get_apply_tensor_subclass for torchao layers
        _check_quantized_interop(model, dense, variant, x, unmerged, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the measured re-quantization report
        model.merge_adapter()
    with torch.no_grad():
        assert (model(x) - unmerged).abs().max().item() <= 5 * quant_error
    model.unmerge_adapter()
    with torch.no_grad():
        assert (model(x) - unmerged).abs().max().item() <= 5 * quant_error


@pytest.mark.parametrize("lib", ["peftkit", "peft"])
def test_two_active_adapters_merge_in_reverse_order(lib: str) -> None:
    """Active adapters rotate in order (``x R_1 R_2 Wᵀ``), so the merged weight is ``W R_2ᵀ R_1ᵀ``: peftkit merges the
    last adapter first. The reference merges in forward order (``W R_1ᵀ R_2ᵀ``), which changes the outputs."""
    lib_ = peftkit if lib == "peftkit" else peft
    torch.manual_seed(0)
    model = lib_.get_peft_model(Wide(), lib_.OFTConfig(target_modules=["lin"], oft_block_size=4, init_weights=False))
    model.add_adapter("other", lib_.OFTConfig(target_modules=["lin"], oft_block_size=4, init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter(["default", "other"])
        diff = (model(x) - unmerged).abs().max().item()
    if lib == "peftkit":
        assert diff <= TOL["atol"] * (1 + unmerged.abs().max().item())
    else:
        assert diff > 1e-3  # documents the reference's behaviour (README)
