"""BOFT: layer math against a plain dense butterfly implementation, merging, multiple adapters, block dropout,
config rules, and interoperability with the reference library (files load both ways with the same outputs).

The reference builds BOFT's block-diagonal matrices with a CUDA extension (``fbd_cuda``) and, where it cannot load
it (every CPU machine), silently uses ``boft_n_butterfly_factor=1``. To compare butterfly factors > 1 on CPU the
interop tests give the reference a stand-in for the extension (:class:`_FakeFbd`, plain ``torch.block_diag``).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from method_interop import LinNet, check_interop_both_ways, quantized_linear
from models import TaskCase, causal_lm_inputs, tiny_llama
from numerics import TINY_MODEL_REDUCTION, fp_tol
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit import BOFTConfig, ConfigError, get_peft_model
from peftkit.errors import UnsupportedModuleError
from peftkit.methods.boft import BOFTLayer

peft = pytest.importorskip("peft")

WEIGHTS = "adapter_model.safetensors"
# outputs of two libraries / code paths: float32 over the tiny models' reductions (plus the rotation's n terms)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
# a single layer: the plain formula (dense n x n products) against the structured one; reductions of <= 64 terms
# in the rotation (3 factors) and the weight product
LAYER_TOL = fp_tol(torch.float32, 4 * 64)


# ---------------------------------------------------------------------------------------------- plain reference
def _plain_perm(n: int, blocks: int, half: int) -> list[int]:
    """The butterfly permutation written out: in every chunk of ``n / blocks`` indices, the groups of ``half``
    indices in the order even groups, then odd groups."""
    chunk = n // blocks
    groups = chunk // half
    order = list(range(0, groups, 2)) + list(range(1, groups, 2))
    perm = []
    for start in range(0, n, chunk):
        for g in order:
            perm.extend(range(start + g * half, start + g * half + half))
    return perm


def _plain_rotation(boft_r: torch.Tensor) -> torch.Tensor:
    """Dense ``R = M_{m-1} ⋯ M_0`` with ``M_i = P_i blockdiag(cayley(R_i)) P_iᵀ`` (``P[k, perm[k]] = 1``) from
    ``boft_r: (m, D, H, H)``; Cayley with an explicit inverse."""
    m, d, h, _ = boft_r.shape
    n = d * h
    rot = torch.eye(n, dtype=torch.float64)
    for i in range(m):
        blocks = []
        for j in range(d):
            a = boft_r[i, j].double()
            s = 0.5 * (a - a.T)
            eye = torch.eye(h, dtype=torch.float64)
            blocks.append((eye - s) @ torch.linalg.inv(eye + s))
        bd = torch.block_diag(*blocks)
        perm = list(range(n)) if m == 1 else _plain_perm(n, d // 2**i, h // 2)
        p = torch.zeros(n, n, dtype=torch.float64)
        for k, idx in enumerate(perm):
            p[k, idx] = 1
        rot = (p @ bd @ p.T) @ rot
    return rot


def _randomize(model: nn.Module, seed: int) -> None:
    """Random ``boft_R`` (std 0.3) and ``boft_s`` around 1, so the adapter is far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "boft_R" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
            elif "boft_s" in name:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))


class _Net(nn.Module):
    """Linear(16 -> 12) -> ReLU -> Conv2d(2 -> 3, 3x3, pad 1, on the reshaped 2x(2x3)... ) kept tiny:
    ``x: (B, 16) -> (B, 3 * 2 * 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)
        self.conv = nn.Conv2d(2, 3, 2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(x)).view(-1, 2, 2, 2)
        return self.conv(h).flatten(1)


def _net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _Net()


# ---------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("kwargs", [
    {"boft_block_size": 4},
    {"boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 2},
    {"boft_block_size": 2, "boft_n_butterfly_factor": 3},
], ids=["oft", "bnum2-f2", "bsize2-f3"])
def test_layer_math_matches_plain_butterfly(kwargs: dict[str, Any]) -> None:
    """Linear: ``y = ((x R) Wᵀ) ⊙ s + b``; Conv2d: ``conv(x, diag(s) W_flat Rᵀ) + b`` with the dense ``R`` of the
    plain implementation above (the conv's ``n = in · kh · kw = 8`` rotated features; lin: 16)."""
    model = get_peft_model(_net(), BOFTConfig(target_modules=["lin", "conv"], **kwargs))
    _randomize(model, 1)
    base = _net()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    lin, conv = model.base_model.model.lin, model.base_model.model.conv
    r_lin, s_lin = lin.boft_R["default"].detach(), lin.boft_s["default"].detach()
    r_conv, s_conv = conv.boft_R["default"].detach(), conv.boft_s["default"].detach()
    assert s_lin.shape == (8, 1) and s_conv.shape == (1, 3)
    rot = _plain_rotation(r_lin).float()
    h = ((x @ rot) @ base.lin.weight.T) * s_lin.flatten() + base.lin.bias
    w = base.conv.weight.reshape(3, -1).double() @ _plain_rotation(r_conv).T * s_conv.T.double()
    expected = F.conv2d(torch.relu(h).view(-1, 2, 2, 2), w.float().view_as(base.conv.weight), base.conv.bias,
                        padding=1).flatten(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **LAYER_TOL)
        rotation = _plain_rotation(r_lin)
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(16, dtype=torch.float64))  # orthogonal


def test_identity_at_init_and_two_adapters_compose() -> None:
    """A default adapter is the identity; two active adapters rotate the inputs by ``R_b R_a`` and scale by
    ``s_a s_b`` (the reference's composition order)."""
    model = get_peft_model(_net(), BOFTConfig(target_modules=["lin"], boft_block_size=4))
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _net()(x), atol=1e-6, rtol=1e-6)
    model.add_adapter("b", BOFTConfig(target_modules=["lin"], boft_block_size=0, boft_block_num=2,
                                      boft_n_butterfly_factor=2))
    _randomize(model, 3)
    model.base_model.set_adapter(["default", "b"])
    layer = model.base_model.model.lin
    ra, rb = (_plain_rotation(layer.boft_R[n].detach()).float() for n in ("default", "b"))
    sa, sb = (layer.boft_s[n].detach().flatten() for n in ("default", "b"))
    base = layer.base_layer
    with torch.no_grad():
        expected = (x @ rb @ ra) @ base.weight.T * sa * sb + base.bias
        torch.testing.assert_close(layer(x), expected, **LAYER_TOL)


# ---------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("kwargs", [{"boft_block_size": 4}, {"boft_block_size": 2, "boft_n_butterfly_factor": 2}],
                         ids=["oft", "f2"])
def test_merge_unmerge_and_unload(kwargs: dict[str, Any]) -> None:
    """Merged outputs equal unmerged ones; unmerging restores the base weights; two adapters merge in sequence;
    ``merge_and_unload`` leaves plain modules with the same outputs."""
    model = get_peft_model(_net(), BOFTConfig(target_modules=["lin", "conv"], **kwargs))
    model.add_adapter("b", BOFTConfig(target_modules=["lin", "conv"], **kwargs))
    _randomize(model, 4)
    model.base_model.set_adapter(["default", "b"])
    model.eval()
    x = torch.randn(3, 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, **TOL)
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in before:
                torch.testing.assert_close(p.detach(), before[n], **TOL)
        torch.testing.assert_close(model(x), unmerged, **TOL)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, BOFTLayer) for m in merged.modules())
        torch.testing.assert_close(merged(x), unmerged, **TOL)


def test_safe_merge_refuses_non_finite() -> None:
    model = get_peft_model(_net(), BOFTConfig(target_modules=["lin"]))
    with torch.no_grad():
        model.base_model.model.lin.boft_s["default"][0, 0] = float("inf")
    before = model.base_model.model.lin.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        model.base_model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.lin.base_layer.weight, before)  # exact: a refused merge writes nothing


# ---------------------------------------------------------------------------------------------- dropout
def _fake_fbd_patch(monkeypatch: pytest.MonkeyPatch, with_extension: bool) -> None:
    """The reference's CUDA extension: absent (CPU behaviour) or the plain stand-in."""
    import peft.tuners.boft.layer as ref_layer

    monkeypatch.setattr(ref_layer, "get_fbd_cuda", (lambda: _FakeFbd) if with_extension else (lambda: None))


class _FakeFbd:
    """Stand-in for ``fbd_cuda``: ``forward(x: (N, D, H, H)) -> [(N, D·H, D·H)]`` block-diagonal, and its gradient."""

    @staticmethod
    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*x[i]) for i in range(x.shape[0])])]

    @staticmethod
    def backward(grad: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        n, d, h, _ = x.shape
        return [torch.stack([torch.stack([grad[i, j * h:(j + 1) * h, j * h:(j + 1) * h] for j in range(d)])
                             for i in range(n)])]


@pytest.mark.parametrize("factors", [1, 2])
def test_block_dropout_matches_reference(monkeypatch: pytest.MonkeyPatch, factors: int) -> None:
    """In training, ``boft_dropout`` replaces ``int(p · D)`` random blocks of one random factor by the identity,
    drawing from the global RNG as the reference does: the same seed gives the reference's outputs. In eval mode
    it does nothing."""
    _fake_fbd_patch(monkeypatch, with_extension=True)
    kwargs = {"boft_block_size": 2, "boft_n_butterfly_factor": factors, "boft_dropout": 0.5}
    ours = get_peft_model(_net(), BOFTConfig(target_modules=["lin"], **kwargs))
    ref = peft.get_peft_model(_net(), peft.BOFTConfig(target_modules=["lin"], **kwargs))
    _randomize(ours, 5)
    _randomize(ref, 5)
    x = torch.randn(2, 16)
    ours.train()
    ref.train()
    outs = []
    for model in (ours, ref):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(torch.stack([model(x) for _ in range(3)]))
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    ours.eval()
    with torch.no_grad():
        assert not torch.allclose(outs[0][0], ours(x))  # half the blocks were dropped in training


# ---------------------------------------------------------------------------------------------- interop
#: model case -> targets (Llama: k_proj/v_proj map 32 -> 16, down_proj has 64 inputs)
CASES: dict[str, list[str]] = {
    "llama-causal": ["q_proj", "v_proj", "down_proj"],
    "bert-feat": ["query", "value", "dense"],
    "conv2d": ["lin", "conv"],
}


def _net_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch_size, 16, generator=torch.Generator().manual_seed(9))}


#: the Linear + Conv2d net of this file as a model case
NET_CASE = TaskCase("conv2d", None, _net, _net_inputs, CASES["conv2d"], output_key=None)
BLOCKS = {
    "oft": {"boft_block_size": 4},
    "bnum-f2": {"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 2},
}


def _perturb_with_bias(model: nn.Module, seed: int) -> None:
    """:func:`_randomize`, and the trained (``bias="boft_only"``) bias of the net's ``lin`` moved, so it is saved."""
    _randomize(model, seed)
    with torch.no_grad():
        model.base_model.model.lin.base_layer.bias.add_(0.5)


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("case", list(CASES))
def test_interop_both_ways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, blocks: str) -> None:
    """An adapter perturbed away from the identity, saved by either library and loaded by the other, gives the
    same outputs (1e-5); both save the same keys, shapes, dtypes and config, with every field of the
    reference's."""
    _fake_fbd_patch(monkeypatch, with_extension=BLOCKS[blocks].get("boft_n_butterfly_factor", 1) > 1)
    kwargs = {"target_modules": CASES[case], **BLOCKS[blocks], "bias": "boft_only" if case == "conv2d" else "none"}
    check_interop_both_ways(NET_CASE if case == "conv2d" else case, lambda lib: lib.BOFTConfig(**kwargs), tmp_path,
                            markers=None, perturb=_perturb_with_bias if case == "conv2d" else _randomize,
                            saved=BLOCKS[blocks], min_change=1e-3)
    ref_fields = peft.BOFTConfig(**kwargs).to_dict().keys()
    assert set(ref_fields) <= set(json.loads((tmp_path / "ours" / "adapter_config.json").read_text()))


# ---------------------------------------------------------------------------------------------- config / errors
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"boft_block_size": 0, "boft_block_num": 0}, "boft_block_size"),
    ({"boft_block_size": 4, "boft_block_num": 2}, "boft_block_num"),
    ({"boft_block_size": -1}, "boft_block_size"),
    ({"boft_block_size": 2.5}, "boft_block_size"),
    ({"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor"),
    ({"boft_dropout": 1.5}, "boft_dropout"),
    ({"bias": "lora_only"}, "bias"),
    ({"init_weights": "gaussian"}, "init_weights"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
])
def test_config_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        BOFTConfig(target_modules=["lin"], **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"boft_block_size": 3}, "boft_block_size"),  # 16 inputs
    ({"boft_block_size": 0, "boft_block_num": 3}, "boft_block_num"),
    ({"boft_block_size": 4, "boft_n_butterfly_factor": 4}, "boft_n_butterfly_factor"),  # 4 * 2**3 > 16
    ({"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 4}, "boft_n_butterfly_factor"),
    ({"boft_block_size": 0, "boft_block_num": 16, "boft_n_butterfly_factor": 2}, "boft_block_size"),  # size 1: odd
])
def test_layer_width_errors_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    """A width that does not split into the configured blocks fails at planning, naming the field, and leaves the
    model untouched."""
    net = _net()
    with pytest.raises(ConfigError) as info:
        get_peft_model(net, BOFTConfig(target_modules=["lin"], **kwargs))
    assert info.value.field == field
    assert not any(isinstance(m, BOFTLayer) for m in net.modules())


@pytest.mark.parametrize("module", [nn.Conv1d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Embedding(10, 4)],
                         ids=["conv1d", "grouped-conv2d", "embedding"])
def test_unsupported_modules_are_refused(module: nn.Module) -> None:
    """As the reference: only nn.Linear and nn.Conv2d with groups == 1 (grouped: also a NotImplementedError)."""
    net = nn.Sequential(module)
    with pytest.raises(UnsupportedModuleError) as info:
        get_peft_model(net, BOFTConfig(target_modules=["0"], boft_block_size=2))
    if isinstance(module, nn.Conv2d):
        assert isinstance(info.value, NotImplementedError)


def test_bias_boft_only_trains_the_adapted_biases() -> None:
    """``bias="boft_only"`` trains the biases of the adapted layers only (``"all"``: every bias), as the reference."""
    model = get_peft_model(_net(), BOFTConfig(target_modules=["lin"], bias="boft_only"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.lin.base_layer.bias", "base_model.model.lin.boft_R.default",
                         "base_model.model.lin.boft_s.default"]


def test_trainable_parameter_count_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same trainable parameter count as the reference for a butterfly config (``factors · n · H + out``)."""
    _fake_fbd_patch(monkeypatch, with_extension=True)
    kwargs = {"target_modules": ["lin"], "boft_block_size": 2, "boft_n_butterfly_factor": 3}
    ours = get_peft_model(_net(), BOFTConfig(**kwargs))
    ref = peft.get_peft_model(_net(), peft.BOFTConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] == 3 * 16 * 2 + 8  # 3 factors of 8 blocks 2x2, boft_s: 8


# ---------------------------------------------------------------------------------------------- training path
def test_fast_linear_backward_matches_plain_autograd() -> None:
    """``rotated_linear`` (rebuilds ``W'`` in backward instead of saving it) gives the plain autograd path's output
    and gradients for ``x``, the bias, the scale and the blocks of two adapters (butterfly permutations included)."""
    from peftkit.methods.boft.butterfly import butterfly_perms, cayley, rotated_linear, rotated_weight

    gen = torch.Generator().manual_seed(3)
    weight, bias0 = torch.randn(6, 16, generator=gen), torch.randn(6, generator=gen)
    raw = [0.3 * torch.randn(2, 4, 4, 4, generator=gen), 0.3 * torch.randn(1, 8, 2, 2, generator=gen)]
    perms = [butterfly_perms(16, 4, 4, 2), butterfly_perms(16, 2, 8, 1)]
    x0, s0 = torch.randn(3, 5, 16, generator=gen), 1 + 0.1 * torch.randn(6, 1, generator=gen)
    grad_out = torch.randn(3, 5, 6, generator=gen)
    results = []
    for fast in (True, False):
        x, s, b = (t.clone().requires_grad_() for t in (x0, s0, bias0))
        rs = [r.clone().requires_grad_() for r in raw]
        qs = [cayley(r.reshape(-1, r.shape[-1], r.shape[-1])).view(r.shape) for r in rs]
        if fast:
            y = rotated_linear(x, weight, b, s, qs, perms)
        else:
            y = F.linear(x, rotated_weight(weight, s, qs, perms), b)
        y.backward(grad_out)
        results.append([y.detach(), x.grad, s.grad, b.grad, *(r.grad for r in rs)])
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, **LAYER_TOL)


def test_training_gradients_match_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """One training forward/backward on tiny Llama (butterfly factor 2): the loss and every adapter gradient equal
    the reference's (same weights)."""
    _fake_fbd_patch(monkeypatch, with_extension=True)
    kwargs = {"target_modules": ["q_proj", "v_proj", "down_proj"], "boft_block_size": 4, "boft_n_butterfly_factor": 2}
    models = [get_peft_model(tiny_llama(), BOFTConfig(**kwargs)), peft.get_peft_model(tiny_llama(),
                                                                                      peft.BOFTConfig(**kwargs))]
    grads = []
    for model in models:
        _randomize(model, 13)
        model.eval()  # no base dropout; boft_dropout is 0
        loss = model(**causal_lm_inputs(2)).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    torch.testing.assert_close(loss_a, loss_b, **TOL)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], **TOL, msg=name)


def test_reference_file_without_cuda_extension_loads_as_trained(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference without its CUDA extension (any CPU machine) silently trains ``boft_n_butterfly_factor=1`` and
    saves ``boft_R: (1, ...)`` under a config saying 2. peftkit loads such a file as it was trained (1 factor, a
    warning naming the mismatch) with the reference's outputs, where a plain load would fail on the shapes."""
    _fake_fbd_patch(monkeypatch, with_extension=False)
    kwargs = {"target_modules": ["lin", "conv"], "boft_block_size": 2, "boft_n_butterfly_factor": 2}
    ref = peft.get_peft_model(_net(), peft.BOFTConfig(**kwargs))
    _randomize(ref, 17)
    ref.save_pretrained(tmp_path)
    assert load_file(str(tmp_path / WEIGHTS))["base_model.model.lin.boft_R"].shape[0] == 1
    x = torch.randn(2, 16)
    with pytest.warns(peftkit.PeftWarning, match="butterfly factor"):
        loaded = peftkit.PeftModel.from_pretrained(_net(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref.eval()(x), **TOL)
    assert loaded.peft_config["default"].boft_n_butterfly_factor == 2  # the stored config is the file's


def test_conv2d_keeps_the_base_convolution_parameters() -> None:
    """A Conv2d with a non-square kernel, dilation and unequal stride/padding computes
    ``conv(x, diag(s) W_flat Rᵀ)`` with all of the base's parameters (the reference passes only ``padding[0]`` and
    ``stride[0]``, drops ``dilation`` and sizes ``R`` as ``in · kh · kh``, so such layers fail or compute another
    convolution there)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)))
    base = nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)))
    base.load_state_dict(net.state_dict())
    model = get_peft_model(net, BOFTConfig(target_modules=["0"], boft_block_size=3))
    _randomize(model, 19)
    layer = model.base_model.model[0]
    r, s = layer.boft_R["default"].detach(), layer.boft_s["default"].detach()
    assert r.shape == (1, 4, 3, 3)  # n = 2 · 3 · 2 = 12
    w = (base[0].weight.reshape(3, -1).double() @ _plain_rotation(r).T * s.T.double()).float()
    x = torch.randn(2, 2, 7, 9)
    expected = F.conv2d(x, w.view_as(base[0].weight), base[0].bias, stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **LAYER_TOL)


def test_mixed_batch_rows_use_their_adapter() -> None:
    """``adapter_names=[...]``: each row's output equals that adapter's output alone (``"__base__"``: the base)."""
    model = get_peft_model(_net(), BOFTConfig(target_modules=["lin", "conv"], boft_block_size=2))
    model.add_adapter("b", BOFTConfig(target_modules=["lin"], boft_block_size=0, boft_block_num=2,
                                      boft_n_butterfly_factor=2))
    _randomize(model, 23)
    model.eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        mixed = model(x, adapter_names=["b", "__base__", "default"])
        model.set_adapter("b")
        only_b = model(x)
        model.set_adapter("default")
        only_default = model(x)
        with model.disable_adapter():
            base = model(x)
    torch.testing.assert_close(mixed, torch.stack([only_b[0], base[1], only_default[2]]), **TOL)


def test_inspect_strength_is_the_distance_from_identity() -> None:
    """``peftkit inspect``'s measure of a BOFT layer (``MethodSpec.update_strength``): ``sqrt(‖R - I‖_F² +
    ‖s - 1‖²)`` from the saved tensors (0 for a fresh adapter)."""
    spec = peftkit.get_method("BOFT")
    model = get_peft_model(_net(), BOFTConfig(target_modules=["lin"], boft_block_size=2, boft_n_butterfly_factor=2))
    layer = model.base_model.model.lin
    params = {"boft_R": layer.boft_R["default"].detach(), "boft_s": layer.boft_s["default"].detach()}
    assert spec.update_strength(params, {})[2] == 0
    _randomize(model, 29)
    params = {"boft_R": layer.boft_R["default"].detach(), "boft_s": layer.boft_s["default"].detach()}
    shape, _, strength, _ = spec.update_strength(params, {})
    rotation = _plain_rotation(params["boft_R"])
    expected = ((rotation - torch.eye(16, dtype=torch.float64)).pow(2).sum()
                + (params["boft_s"].double() - 1).pow(2).sum()).sqrt()
    assert shape == [8, 16]
    assert math.isclose(strength, float(expected), rel_tol=1e-9)


# ---------------------------------------------------------------------------------------------- quantized bases
@pytest.mark.parametrize("variant", ["8bit", "nf4", "torchao-int8"])
def test_quantized_linear_matches_reference_trains_and_merges(monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    """On a quantized linear the inputs are rotated (``y = (base(x R) - b) ⊙ s + b``, the reference's form):
    same outputs as the reference on the same quantized layer, gradients reach ``boft_R`` / ``boft_s``, merging
    re-quantizes within a few quantization errors of the unmerged outputs, and unmerging restores them likewise."""
    from peftkit.layers.dispatch import QUANT_LINEAR, module_kind

    _fake_fbd_patch(monkeypatch, with_extension=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dense = nn.Linear(64, 32)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    kwargs = {"target_modules": ["lin"], "boft_block_size": 4, "boft_n_butterfly_factor": 2}
    ours = get_peft_model(LinNet(quantized_linear(variant, dense)), BOFTConfig(**kwargs))
    layer = ours.base_model.model.lin
    assert module_kind(layer) == QUANT_LINEAR
    _randomize(ours, 31)
    rot, s = _plain_rotation(layer.boft_R["default"].detach()).float(), layer.boft_s["default"].detach().flatten()
    base = quantized_linear(variant, dense)
    with torch.no_grad():  # train mode throughout: bitsandbytes picks other kernels in eval mode
        quant_error = (base(x) - dense(x)).abs().max().item()
        unmerged = ours(x)
        # the same quantized kernel on inputs rotated by two code paths (a few ulp apart): 1e-4 covers the 8-bit
        # kernel's re-quantization of its inputs
        torch.testing.assert_close(unmerged, (base(x @ rot) - base.bias) * s + base.bias, atol=1e-4, rtol=1e-4)
        if variant != "torchao-int8":  # the reference needs transformers' torchao quantizer for torchao layers
            ref = peft.get_peft_model(LinNet(quantized_linear(variant, dense)), peft.BOFTConfig(**kwargs))
            _randomize(ref, 31)
            torch.testing.assert_close(unmerged, ref(x), atol=1e-4, rtol=1e-4)
    ours(x).pow(2).mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(grads) == ["base_model.model.lin.boft_R.default", "base_model.model.lin.boft_s.default"]
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantized-merge report
        ours.merge_adapter()
    with torch.no_grad():
        assert (ours(x) - unmerged).abs().max().item() <= 5 * quant_error
    ours.unmerge_adapter()
    with torch.no_grad():
        assert (ours(x) - unmerged).abs().max().item() <= 5 * quant_error


def test_fan_in_fan_out_on_linear_warns_and_is_ignored() -> None:
    """As the reference: ``fan_in_fan_out=True`` on an ``nn.Linear`` warns and changes nothing."""
    with pytest.warns(peftkit.PeftWarning, match="fan_in_fan_out"):
        model = get_peft_model(_net(), BOFTConfig(target_modules=["lin"], fan_in_fan_out=True))
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _net()(x), atol=1e-6, rtol=1e-6)
