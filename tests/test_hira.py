"""HiRA (Hadamard high-rank adaptation): every layer kind against the formula ``ΔW = W0 ⊙ (B A)`` written here, the
training autograd function against plain autograd, merging, init modes, config errors, unsupported modules, and
interop both ways with the reference (tiny Llama, BERT, GPT-2 ``Conv1D``, an MLP, Conv1d/Conv2d and an embedding).

The generic properties (identity, merge, save/load, multi-adapter, errors) come from the conformance suite.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from method_interop import check_interop_both_ways
from numerics import fp_tol
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import HiraConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError, PeftWarning, UnsupportedModuleError
from peftkit.methods.hira import HiraGroupedConvError, HiraLayer
from peftkit.methods.hira.hadamard import HadamardLinear, plain_hadamard_linear

TARGETS = ["lin", "gpt", "emb", "c1", "c2", "c3", "c2c"]


# ------------------------------------------------------------------------------------------------ plain math
class _Net(nn.Module):
    """One module of every kind HiRA adapts, each fed its own input; outputs concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 7)
        self.gpt = Conv1D(6, 12)  # transformers' GPT-2 Conv1D: weight (in=12, out=6)
        self.emb = nn.Embedding(20, 5)
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        self.c3 = nn.Conv3d(2, 3, (1, 1, 3))  # the reference's 1x1 shortcut breaks on this kernel; the formula holds
        self.c2c = nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular")

    def forward(self, x: torch.Tensor, ids: torch.Tensor, seq: torch.Tensor, img: torch.Tensor,
                vol: torch.Tensor) -> torch.Tensor:
        outs = [self.lin(x), self.gpt(x), self.emb(ids), self.c1(seq), self.c2(img), self.c3(vol), self.c2c(img)]
        return torch.cat([o.flatten(1) for o in outs], dim=1)


def _inputs(batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 12, generator=gen), "ids": torch.randint(0, 20, (batch, 4), generator=gen),
            "seq": torch.randn(batch, 3, 9, generator=gen), "img": torch.randn(batch, 3, 6, 7, generator=gen),
            "vol": torch.randn(batch, 2, 3, 4, 5, generator=gen)}


def _net_peft(r: int = 3, seed: int = 0, **kwargs: Any) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(_Net(), HiraConfig(r=r, target_modules=TARGETS, **{"init_weights": False, **kwargs}))


def plain_product(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """``B A`` (float64, differentiable) in the base weight's layout: ``(out, in)``; ``Conv1D`` / embedding
    transposed; a conv kernel ``P[o, i, *k] = Σ_j B[o, j] A[j, i, *k]``."""
    a, b = a.double(), b.double()
    if kind == "conv":
        return torch.einsum("oj,ji...->oi...", b.flatten(1), a)
    product = b @ a
    return product.T if kind == "transposed" else product


Factors = Callable[[HiraLayer], list[tuple[torch.Tensor, torch.Tensor]]]


def _params(layer: HiraLayer, name: str = "default") -> tuple[nn.Parameter, nn.Parameter]:
    """``(A, B)`` of adapter ``name``: the embedding or the linear/conv parameters."""
    if layer.hira_embedding_A:
        return layer.hira_embedding_A[name], layer.hira_embedding_B[name]
    return layer.hira_A[name], layer.hira_B[name]


def _own_factors(names: list[str]) -> Factors:
    """The layer's own ``(A, B)`` of adapters ``names`` (detached)."""
    return lambda layer: [tuple(t.detach() for t in _params(layer, n)) for n in names]  # type: ignore[misc]


def _plain_forward(model: PeftModel, inputs: dict[str, torch.Tensor], factors: Factors) -> torch.Tensor:
    """The net with every weight replaced by ``W0 ⊙ (1 + Σ B A)`` over ``factors(layer)`` (float64), written with
    plain torch ops."""
    net = model.base_model.model
    x, seq, img, vol = (inputs[k].double() for k in ("x", "seq", "img", "vol"))

    def weight(layer: HiraLayer, kind: str) -> torch.Tensor:
        w0 = layer.get_base_layer().weight.detach().double()
        return w0 * (1 + sum(plain_product(a, b, kind) for a, b in factors(layer)))

    def bias(layer: HiraLayer) -> torch.Tensor:
        return layer.get_base_layer().bias.detach().double()

    lin = x @ weight(net.lin, "linear").T + bias(net.lin)
    gpt = x @ weight(net.gpt, "transposed") + bias(net.gpt)  # Conv1D: y = x W + b with W: (in, out)
    emb = weight(net.emb, "transposed")[inputs["ids"]]
    c1 = F.conv1d(seq, weight(net.c1, "conv"), bias(net.c1), padding=1)
    c2 = F.conv2d(img, weight(net.c2, "conv"), bias(net.c2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    c3 = F.conv3d(vol, weight(net.c3, "conv"), bias(net.c3))
    c2c = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="circular"), weight(net.c2c, "conv"), bias(net.c2c))
    return torch.cat([o.flatten(1) for o in (lin, gpt, emb, c1, c2, c3, c2c)], dim=1)


# float32 layers against float64 plain math: reductions of at most 3·3·3 (conv) or 12 (linear) terms, plus the
# rank-r product inside the weight and the sum of two adapters
TOL_PLAIN = fp_tol(torch.float32, 3 * 3 * 3 + 12)


def test_every_layer_kind_matches_the_plain_formula() -> None:
    """Linear, Conv1D, Embedding, Conv1d, Conv2d (stride, dilation), Conv3d ``(1, 1, 3)`` and a circular-padded
    Conv2d: ``y = op(x, W0 ⊙ (1 + B A)) + b``, for one adapter and for two active adapters (``Σ B_n A_n``)."""
    model = _net_peft().eval()
    model.add_adapter("b", HiraConfig(r=2, target_modules=TARGETS, init_weights=False, fan_in_fan_out=True))
    inputs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).double(), _plain_forward(model, inputs, _own_factors(["default"])),
                                   **TOL_PLAIN)
        model.base_model.set_adapter(["default", "b"])
        torch.testing.assert_close(model(**inputs).double(),
                                   _plain_forward(model, inputs, _own_factors(["default", "b"])), **TOL_PLAIN)


def test_training_forward_and_gradients_match_the_plain_formula() -> None:
    """In training (autograd on, the fused single-product path for the linears), outputs and the factors' gradients
    equal those of the plain float64 formula."""
    model = _net_peft(seed=1).train()
    inputs = _inputs(seed=2)
    out = model(**inputs)
    out.pow(2).sum().backward()
    layers = [m for m in model.modules() if isinstance(m, HiraLayer)]
    leaves = {id(m): [t.detach().double().requires_grad_(True) for t in _params(m)] for m in layers}
    expected = _plain_forward(model, inputs, lambda layer: [tuple(leaves[id(layer)])])
    torch.testing.assert_close(out.double(), expected.detach(), **TOL_PLAIN)
    expected.pow(2).sum().backward()
    for m in layers:
        for param, ref in zip(_params(m), leaves[id(m)]):
            torch.testing.assert_close(param.grad.double(), ref.grad, **fp_tol(torch.float32, 4 * 3 * 3 * 3 * 12))


@pytest.mark.parametrize("base_scale", [0.0, 1.0], ids=["update", "fused"])
@pytest.mark.parametrize("layout", ["linear", "conv1d-view"])
def test_hadamard_linear_matches_plain_autograd(base_scale: float, layout: str) -> None:
    """The memory-lean autograd function (nothing dense saved) against plain autograd: outputs and the gradients of
    ``x``, ``b``, ``A`` and ``B``, for a contiguous ``W`` and a transposed view (GPT-2 ``Conv1D``)."""
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, r = 9, 11, 3
    weight = torch.randn(out_f, in_f, generator=gen) if layout == "linear" else torch.randn(in_f, out_f,
                                                                                           generator=gen).t()
    leaves = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(True)
              for s in ((2, 5, in_f), (out_f,), (r, in_f), (out_f, r))]
    ours = [t.detach().float().requires_grad_(True) for t in leaves]
    y = HadamardLinear.apply(ours[0], weight, ours[1], ours[2], ours[3], base_scale)
    expected = plain_hadamard_linear(leaves[0], weight.double(), leaves[1], leaves[2], leaves[3], base_scale)
    torch.testing.assert_close(y.double(), expected, **fp_tol(torch.float32, in_f + r))
    grad = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    y.backward(grad.float())
    expected.backward(grad)
    for mine, ref in zip(ours, leaves):
        torch.testing.assert_close(mine.grad.double(), ref.grad, **fp_tol(torch.float32, 10 * (in_f + r)))


# ------------------------------------------------------------------------------------------------ merging
def test_merge_equals_unmerged_and_unmerge_restores_exactly() -> None:
    """Merging two adapters one after the other writes ``W0 ⊙ (1 + P_a + P_b)`` (the unmerged output of both);
    unmerging restores the original weights bit for bit; ``merge_and_unload`` keeps the outputs."""
    model = _net_peft().eval()
    model.add_adapter("b", HiraConfig(r=2, target_modules=TARGETS, init_weights=False, fan_in_fan_out=True))
    model.base_model.set_adapter(["default", "b"])
    inputs = _inputs()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        expected = model(**inputs)
        for layer in (m for m in model.modules() if isinstance(m, HiraLayer)):
            layer.merge(adapter_names=["default"])
            layer.merge(adapter_names=["b"])
        torch.testing.assert_close(model(**inputs), expected, **TOL_PLAIN)
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in before:
                assert torch.equal(p, before[n]), n
        torch.testing.assert_close(model(**inputs), expected, **TOL_PLAIN)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, HiraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(**inputs), expected, **TOL_PLAIN)


def test_delta_weight_is_the_additive_form() -> None:
    """``get_delta_weight`` is ``W0 ⊙ P`` (``merge`` adds exactly it); ``hira_product`` is the reference's
    ``get_delta_weight`` (``B A`` in the weight's layout)."""
    model = _net_peft()
    for kind, layer in (("linear", model.base_model.model.lin), ("transposed", model.base_model.model.gpt),
                        ("conv", model.base_model.model.c2)):
        w0 = layer.get_base_layer().weight.detach().double()
        product = plain_product(layer.hira_A["default"].detach(), layer.hira_B["default"].detach(), kind)
        torch.testing.assert_close(layer.hira_product("default").double(), product, **fp_tol(torch.float32, 3))
        torch.testing.assert_close(layer.get_delta_weight("default").double(), w0 * product,
                                   **fp_tol(torch.float32, 3))


# ------------------------------------------------------------------------------------------------ init
def test_init_modes() -> None:
    """True: Kaiming ``A``, zero ``B``; ``"gaussian"``: ``A ~ N(0, 1/r²)`` on linears (as True on convs); embeddings:
    ``A = 0``, ``B ~ N(0, 1)``; False: both random (not identity)."""
    torch.manual_seed(0)
    net = nn.ModuleDict({"lin": nn.Linear(400, 300), "conv": nn.Conv2d(4, 4, 3), "emb": nn.Embedding(50, 400)})
    for init in (True, "gaussian", "Gaussian"):
        model = get_peft_model(nn.ModuleDict(net), HiraConfig(r=8, target_modules=["lin", "conv", "emb"],
                                                              init_weights=init))
        lin, conv, emb = (model.base_model.model[k] for k in ("lin", "conv", "emb"))
        assert not lin.hira_B["default"].any() and not conv.hira_B["default"].any()
        assert not emb.hira_embedding_A["default"].any()
        assert abs(emb.hira_embedding_B["default"].std().item() - 1) < 0.05
        std = lin.hira_A["default"].std().item()
        assert abs(std - (1 / 8 if init != True else 1 / (3 * 400) ** 0.5)) < 0.1 * std
        model.unload()
    model = get_peft_model(nn.ModuleDict(net), HiraConfig(r=8, target_modules=["lin", "emb"], init_weights=False))
    assert model.base_model.model["lin"].hira_B["default"].abs().min() > 0
    assert model.base_model.model["emb"].hira_embedding_A["default"].abs().min() > 0


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "r"),
    ({"r": 2.5}, "r"),
    ({"hira_dropout": 1.0}, "hira_dropout"),
    ({"hira_dropout": "x"}, "hira_dropout"),
    ({"init_weights": "kaiming"}, "init_weights"),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
    ({"rank_pattern": {"lin": 0}}, "rank_pattern['lin']"),
    ({"target_modules": ".*lin", "layers_to_transform": 0}, "layers_to_transform"),
    ({"target_modules": ".*lin", "layers_pattern": "layers"}, "layers_pattern"),
])
def test_config_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        HiraConfig(**kwargs)
    assert isinstance(info.value, ValueError) and field in str(info.value)


def test_unsupported_and_grouped_modules_are_refused() -> None:
    with pytest.raises(UnsupportedModuleError, match="LayerNorm"):
        get_peft_model(nn.Sequential(nn.LayerNorm(4)), HiraConfig(target_modules=["0"]))
    with pytest.raises(HiraGroupedConvError) as info:
        get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), HiraConfig(r=2, target_modules=["0"]))
    assert isinstance(info.value, NotImplementedError) and "groups=2" in str(info.value)


def test_rank_pattern_sets_per_layer_ranks() -> None:
    model = get_peft_model(_Net(), HiraConfig(r=3, target_modules=["lin", "c2"], rank_pattern={"c2": 5}))
    assert model.base_model.model.lin.hira_A["default"].shape == (3, 12)
    assert model.base_model.model.c2.hira_A["default"].shape == (5, 3, 3, 2)
    assert model.base_model.model.c2.hira_B["default"].shape == (4, 5, 1, 1)


# ------------------------------------------------------------------------------------------------ interop
INTEROP = [
    pytest.param("llama-causal", {"r": 4}, id="llama"),
    pytest.param("llama-causal", {"r": 2, "init_weights": "gaussian", "hira_dropout": 0.1}, id="llama-gaussian"),
    pytest.param("bert-feat", {"r": 2}, id="bert"),
    pytest.param("t5-seq2seq", {"r": 2}, id="t5"),
    pytest.param("gpt2-causal", {"r": 2, "fan_in_fan_out": True}, id="gpt2-conv1d"),
    pytest.param("custom-mlp", {"r": 4}, id="mlp"),
    pytest.param("custom-conv2d", {"r": 3}, id="conv2d"),
    pytest.param("custom-conv1d", {"r": 2}, id="conv1d"),
    pytest.param("custom-emb", {"r": 3}, id="embedding"),
]
ESSENTIALS = ("r", "init_weights", "hira_dropout", "fan_in_fan_out", "rank_pattern", "layers_to_transform",
              "layers_pattern")


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Perturbed (non-identity) adapters: the saved files have the same keys, shapes, dtypes and config essentials,
    and each library loads the other's file with the saver's outputs (1e-5)."""
    from method_interop import interop_case

    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, **kwargs}
    check_interop_both_ways(case, lambda lib: lib.HiraConfig(**kw), tmp_path, markers=("hira_",),
                            essentials=ESSENTIALS)


@pytest.mark.interop
def test_reference_file_with_rank_pattern_loads_at_its_ranks(tmp_path: Path) -> None:
    """The reference ignores ``rank_pattern`` when it wraps a module (its dispatcher reads ``config.r``), so its
    files hold rank ``r`` everywhere; peftkit honours ``rank_pattern`` and loads such a file at the file's ranks,
    with a warning, giving the reference's outputs."""
    import peft
    from method_interop import case_output, interop_case, perturb_adapter

    case = interop_case("llama-causal")
    kw = {"r": 2, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 3}, "task_type": "CAUSAL_LM"}
    ours = get_peft_model(case.build(), HiraConfig(**kw))
    assert ours.base_model.model.model.layers[0].self_attn.v_proj.hira_A["default"].shape[0] == 3
    torch.manual_seed(0)
    ref = peft.get_peft_model(case.build(), peft.HiraConfig(**kw)).eval()
    assert ref.base_model.model.model.layers[0].self_attn.v_proj.hira_A["default"].shape[0] == 2
    perturb_adapter(ref, ("hira_",), seed=5)
    ref.save_pretrained(str(tmp_path))
    with pytest.warns(PeftWarning, match="rank_pattern"):
        loaded = PeftModel.from_pretrained(case.build(), str(tmp_path)).eval()
    torch.testing.assert_close(case_output(loaded, case), case_output(ref, case), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ quantized bases
@pytest.mark.parametrize("quant", ["8bit", "nf4", "torchao-int8"])
def test_quantized_linear_matches_the_formula_trains_and_merges(quant: str) -> None:
    """bitsandbytes 8-bit / 4-bit and torchao int8 bases: ``y = base(x) + x (Ŵ ⊙ B A)ᵀ`` with ``Ŵ`` the dequantized weight (as the
    reference); gradients reach ``A`` and ``B``; merging re-quantizes ``Ŵ ⊙ (1 + B A)`` (outputs within the
    quantization error) and unmerging restores the outputs."""
    from method_interop import quantized_linear

    from peftkit.quantization import dense_weight

    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    x = torch.randn(16, 64)
    model = get_peft_model(nn.Sequential(quantized_linear(quant, dense)), HiraConfig(r=4, target_modules=["0"],
                                                                                init_weights=False))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.hira_A["default"].mul_(0.1)  # a modest update, so the merge's rounding stays comparable
    model.train()  # train mode throughout: bitsandbytes picks other kernels in eval mode
    w = dense_weight(layer.get_base_layer()).detach().double()
    product = plain_product(layer.hira_A["default"].detach(), layer.hira_B["default"].detach(), "linear")
    with torch.no_grad():
        base_out = layer.get_base_layer()(x)
        quant_error = (base_out - dense(x)).abs().max().item()
    out = model(x)
    torch.testing.assert_close(out.double(), base_out.double() + x.double() @ (w * product).T,
                               **fp_tol(torch.float32, 64 + 4))
    out.pow(2).mean().backward()
    assert layer.hira_A["default"].grad.abs().sum() > 0 and layer.hira_B["default"].grad.abs().sum() > 0
    import warnings

    import peftkit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", peftkit.QuantizedMergeWarning)
        model.merge_adapter()
    with torch.no_grad():
        merged = model(x)
    bound = 5 * quant_error * (1 + product.abs().max().item())  # W ⊙ (1 + P) re-quantized: W's rounding, scaled
    assert (merged - out.detach()).abs().max().item() <= bound
    model.unmerge_adapter()
    with torch.no_grad():
        assert (model(x) - out.detach()).abs().max().item() <= 2 * bound


# ------------------------------------------------------------------------------------------------ mixed batches
def test_mixed_batch_rows_match_single_adapter_runs() -> None:
    """``adapter_names=`` per row (two adapters and the base) on a tiny Llama with HiRA on the attention and the
    embedding: each row equals a run of that row with its adapter alone."""
    from method_interop import case_model, check_mixed_batch_rows

    model = get_peft_model(case_model("llama-causal"), HiraConfig(r=2, target_modules=["q_proj", "v_proj",
                                                                                        "embed_tokens"],
                                                                  init_weights=False)).eval()
    model.add_adapter("other", HiraConfig(r=3, target_modules=["q_proj", "embed_tokens"], init_weights=False))
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    # the same layers on a row subset: batched matmuls may block differently (reductions of the tiny model's width)
    check_mixed_batch_rows(model, {"input_ids": ids}, ["other", "__base__", "default"],
                           fp_tol(torch.float32, 256))
