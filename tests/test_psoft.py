"""PSOFT (``PsoftConfig``): ``y = W x + scaling · B (R − I) A x`` with frozen SVD factors ``A: (r, in)``,
``B: (out, r)`` of the base weight and a trained ``r × r`` transform ``R``.

Checked against a plain implementation of the paper's formula written here, and against the reference both ways
(files saved by either library load in the other with the same outputs and the same keys) on a tiny Llama, a BERT
encoder and a custom MLP.
"""

from __future__ import annotations

import warnings
from pathlib import Path

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
from peftkit.methods.psoft import PsoftLayer
from tests.models import tiny_gpt2
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

peft = pytest.importorskip("peft")

#: both libraries run the same math through their own matmul orders (x Aᵀ (R − I)ᵀ Bᵀ against (xAᵀRᵀ − xAᵀ) Bᵀ) and
#: identical SVDs of the same weights: a few ulp per term of the tiny models' longest reduction
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)

#: one config per main option: Cayley (default), Cayley-Neumann with PiSSA factors, free R with the seeded lowrank SVD
CONFIGS = {
    "cayley": {"r": 4},
    "neumann-pissa": {"r": 4, "ab_svd_init": "pissa_init", "use_cayley_neumann": True, "num_cayley_neumann_terms": 4,
                      "cayley_neumann_eps": 0.9, "psoft_mag_a": False},
    "free-lowrank": {"r": 3, "psoft_orth": False, "psoft_svd": "lowrank", "psoft_svd_lowrank_niter": 3,
                     "random_seed": 7, "psoft_mag_b": False, "psoft_alpha": 8},
}


#: model name -> (model case of tests/models.py, targets)
MODELS = {
    "mlp": ("custom-mlp", ["lin0", "lin1"]),
    "llama": ("llama-causal", ["q_proj", "v_proj", "down_proj"]),
    "bert": ("bert-feat", ["query", "value", "dense"]),
}


def _base(name: str) -> nn.Module:
    return case_model(MODELS[name][0])


def _output(model: nn.Module, name: str) -> torch.Tensor:
    return case_output(model, interop_case(MODELS[name][0]))


def _config(lib, name: str, options: str, **extra) -> object:
    targets = MODELS[name][1]
    kwargs = {**CONFIGS[options], **extra}
    if name == "mlp":
        kwargs["r"] = min(kwargs["r"], 2)  # lin1 is Linear(20, 2)
    return lib.PsoftConfig(target_modules=targets, **kwargs)


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Move every trained tensor of R away from its init (R ≠ I, scale vectors ≠ 1)."""
    perturb_adapter(model, ("psoft_R",), seed, scale=0.2)


def _build(lib, name: str, options: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(_base(name), _config(lib, name, options))
    _perturb(model)
    return model.eval()


# ------------------------------------------------------------------------------------------------ math


def _plain_R(theta: torch.Tensor, r: int, orth: bool, neumann_terms: int | None, eps: float | None,
             vb: torch.Tensor | None, va: torch.Tensor | None) -> torch.Tensor:
    """R of the paper: Cayley ``(I + Q)(I − Q)⁻¹`` (or its Neumann series) of ``Q = U − Uᵀ``, scaled."""
    if not orth:
        R = theta
    else:
        U = torch.zeros(r, r, dtype=torch.float64)
        k = 0
        for i in range(r):
            for j in range(i + 1, r):
                U[i, j] = theta[k]
                k += 1
        Q = U - U.T
        eye = torch.eye(r, dtype=torch.float64)
        if neumann_terms is None:
            R = (eye + Q) @ torch.linalg.inv(eye - Q)
        else:
            if eps is not None and torch.linalg.norm(Q) > eps:
                Q = Q * eps / torch.linalg.norm(Q)
            # reference's series: I + 2Q + 2Q² + ... + 2Q^(t-2) + Q^(t-1)
            R = eye + sum(2 * torch.linalg.matrix_power(Q, p) for p in range(1, neumann_terms - 1))
            R = R + torch.linalg.matrix_power(Q, neumann_terms - 1)
    if vb is not None:
        R = torch.diag(vb) @ R
    if va is not None:
        R = R @ torch.diag(va)
    return R


@pytest.mark.parametrize("options", list(CONFIGS))
def test_layer_matches_plain_formula(options: str) -> None:
    """``y = W x + b + B (R − I) A x · scaling`` with the top-r SVD of W (float64 here)."""
    model = _build(peftkit, "mlp", options)
    layer = model.base_model.model.lin0
    assert isinstance(layer, PsoftLayer)
    cfg = _config(peftkit, "mlp", options)
    W = layer.get_base_layer().weight.detach().double()
    r, alpha = cfg.r, cfg.psoft_alpha
    if cfg.psoft_svd == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:  # the seeded random projection: take the layer's own factors (checked for determinism below)
        A, B = layer._psoft_A_cache["default"].double(), layer._psoft_B_cache["default"].double()
        U, S, Vh = B / B.norm(dim=0), B.norm(dim=0) * alpha / r, A
    scaling = alpha / r
    if cfg.ab_svd_init == "psoft_init":
        A, B = Vh, U @ torch.diag(S / scaling)
    else:
        root = torch.sqrt(S / scaling)
        A, B = torch.diag(root) @ Vh, U @ torch.diag(root)
    R_mod = layer.psoft_R["default"]
    get = lambda p: None if p is None else p.detach().double()
    R = _plain_R(get(R_mod.weight), r, cfg.psoft_orth, cfg.num_cayley_neumann_terms if cfg.use_cayley_neumann
                 else None, cfg.cayley_neumann_eps, get(R_mod.vector_b), get(R_mod.vector_a))
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    bias = layer.get_base_layer().bias.detach().double()
    expected = x @ W.T + bias + scaling * (x @ A.T @ (R - torch.eye(r, dtype=torch.float64)).T @ B.T)
    with torch.no_grad():
        got = layer(x.float())
    # float32 against float64 over reductions of length in=10 and r: a few ulp
    torch.testing.assert_close(got.double(), expected, **fp_tol(torch.float32, 32))


def test_cayley_R_is_orthogonal_and_frozen_factors_do_not_train() -> None:
    config = peftkit.PsoftConfig(r=2, target_modules=["lin0"], psoft_mag_a=False, psoft_mag_b=False,
                                 init_weights=False)
    model = peftkit.get_peft_model(_base("mlp"), config)
    layer = model.base_model.model.lin0
    R = layer.psoft_R["default"].matrix().detach().double()
    torch.testing.assert_close(R @ R.T, torch.eye(2, dtype=torch.float64), **fp_tol(torch.float32, 2))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.lin0.psoft_R.default.weight"]
    assert layer.psoft_R["default"].weight.shape == (1,)  # r(r-1)/2
    assert not any("_psoft_" in k for k in model.state_dict())  # A and B are rebuilt, never stored


def test_identity_at_init_exactly() -> None:
    """R = I exactly at init (Q = 0 solves to I), so the update is zero and the output is the base output."""
    base = _output(_base("llama"), "llama")
    for options in CONFIGS:
        model = peftkit.get_peft_model(_base("llama"), _config(peftkit, "llama", options))
        torch.testing.assert_close(_output(model, "llama"), base, atol=0, rtol=0)  # exact zero update


def test_lowrank_svd_is_seeded_and_leaves_global_rng_alone() -> None:
    """The random projection of ``psoft_svd='lowrank'`` is seeded by ``random_seed``, so a rebuilt adapter has the
    same factors; the caller's RNG stream is unchanged."""
    def factors(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        config = _config(peftkit, "llama", "free-lowrank")
        model = peftkit.get_peft_model(_base("llama"), config)
        after = torch.rand(1)
        torch.manual_seed(seed)
        assert torch.equal(after, torch.rand(1))  # the fork restored the stream
        return model.base_model.model.model.layers[0].self_attn.q_proj._psoft_A_cache["default"]

    assert torch.equal(factors(0), factors(123))  # same kernels on the same data


# ------------------------------------------------------------------------------------------------ interop


@pytest.mark.parametrize("options", list(CONFIGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_interop_both_ways(name: str, options: str, tmp_path: Path) -> None:
    """A perturbed adapter saved by either library loads in the other with the same outputs (1e-5), keys and
    config; the adapter is not identity."""
    check_interop_both_ways(MODELS[name][0], lambda lib: _config(lib, name, options), tmp_path,
                            markers=None, perturb=_perturb, min_change=1e-3, saved={k: v for k, v in CONFIGS[options].items() if k != "r"})


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("options", list(CONFIGS))
def test_merge_unmerge_and_merge_and_unload(options: str) -> None:
    model = _build(peftkit, "llama", options)
    base = _output(_base("llama"), "llama")
    expected = _output(model, "llama")
    model.merge_adapter()
    # the merged weights W + ΔW run other kernels than the factored update: fp32 tolerance of the tiny model
    torch.testing.assert_close(_output(model, "llama"), expected, **TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(_output(model, "llama"), expected, **TOL)
    with model.disable_adapter():
        torch.testing.assert_close(_output(model, "llama"), base, **TOL)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, PsoftLayer) for m in merged.modules())
    torch.testing.assert_close(_output(merged, "llama"), expected, **TOL)


def test_delta_weight_matches_reference_layer() -> None:
    """``get_delta_weight`` equals the reference's ``B (R − I) A · scaling`` for the same adapter."""
    ours = _build(peftkit, "mlp", "cayley")
    ref = _build(peft, "mlp", "cayley")
    for name in ("lin0", "lin1"):
        a = getattr(ours.base_model.model, name).get_delta_weight("default")
        b = getattr(ref.base_model.model, name).get_delta_weight("default")
        torch.testing.assert_close(a, b, **fp_tol(torch.float32, 20))


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("field, value", [
    ("r", 0), ("ab_svd_init", "random"), ("psoft_svd", "randomized"), ("psoft_dropout", 1.5),
    ("psoft_orth", "yes"), ("num_cayley_neumann_terms", 0), ("cayley_neumann_eps", 1.5),
])
def test_bad_config_values_raise_config_error_naming_field(field: str, value: object) -> None:
    extra = {"use_cayley_neumann": True} if "cayley" in field else {}
    with pytest.raises(ConfigError) as info:
        peftkit.PsoftConfig(target_modules=["q_proj"], **{field: value}, **extra)
    assert isinstance(info.value, ValueError) and info.value.field == field
    assert field in str(info.value) and repr(value) in str(info.value) and "allowed" in str(info.value)


def test_layers_rules_and_ignored_options_warn() -> None:
    with pytest.raises(ConfigError, match="layers_to_transform"):
        peftkit.PsoftConfig(target_modules=".*proj", layers_to_transform=[0])
    with pytest.raises(ConfigError, match="layers_pattern"):
        peftkit.PsoftConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.warns(UserWarning, match="psoft_svd_lowrank_niter"):
        peftkit.PsoftConfig(target_modules=["q_proj"], psoft_svd_lowrank_niter=3)
    with pytest.warns(UserWarning, match="num_cayley_neumann_terms"):
        peftkit.PsoftConfig(target_modules=["q_proj"], num_cayley_neumann_terms=3)


def test_rank_above_layer_size_and_unsupported_module_raise() -> None:
    with pytest.raises(ConfigError, match=r"r=3.*Linear\(20, 2\)") as info:
        peftkit.get_peft_model(_base("mlp"), peftkit.PsoftConfig(r=3, target_modules=["lin1"]))
    assert info.value.field == "r"
    with pytest.raises(UnsupportedModuleError, match="PSOFT supports torch.nn.Linear"):
        peftkit.get_peft_model(tiny_gpt2(), peftkit.PsoftConfig(r=2, target_modules=["c_attn"]))


# ------------------------------------------------------------------------------------------------ traps


def test_mixed_batch_routes_each_row_to_its_adapter() -> None:
    """``adapter_names=[...]`` applies each row's adapter (the reference's PSOFT layers ignore ``adapter_names`` and
    apply the active adapter to every row)."""
    model = _build(peftkit, "llama", "cayley")
    model.add_adapter("other", _config(peftkit, "llama", "neumann-pissa", init_weights=False))
    ids = torch.tensor([[1, 5, 9, 3, 60, 7], [4, 8, 2, 6, 10, 12]])
    # row-gathered inputs run the same kernels on fewer rows: fp32 tolerance of the tiny model
    mixed = check_mixed_batch_rows(model, {"input_ids": ids}, ["default", "other"], TOL)
    model.set_adapter("default")
    with torch.no_grad():  # row 1 really gets the other adapter
        assert (mixed[1] - model(input_ids=ids[1:]).logits[0]).abs().max() > 1e-3


def test_fan_in_fan_out_on_linear_warns_and_leaves_the_config_unchanged() -> None:
    """The reference resets ``config.fan_in_fan_out`` on the user's object; peftkit warns and ignores it."""
    config = peftkit.PsoftConfig(r=2, target_modules=["lin0"], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out=True is not compatible"):
        model = peftkit.get_peft_model(_base("mlp"), config)
    assert config.fan_in_fan_out is True and model.peft_config["default"].fan_in_fan_out is True
    torch.testing.assert_close(_output(model, "mlp"), _output(_base("mlp"), "mlp"), atol=0, rtol=0)  # exact zero update


def test_inspect_reports_distance_of_R_from_identity(tmp_path: Path) -> None:
    """``peftkit inspect`` measures ``‖R − I‖_F`` per layer from the saved tensors (the SVD of W is not saved)."""
    from peftkit.cli.inspect_cmd import inspect_adapter

    model = _build(peftkit, "llama", "neumann-pissa")
    model.save_pretrained(tmp_path)
    layers = {entry["module"]: entry for entry in inspect_adapter(str(tmp_path))["layers"]}
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = q.psoft_R["default"].minus_identity().detach().double().norm().item()
    entry = layers["model.layers.0.self_attn.q_proj"]
    assert entry["shape"] == [4, 4] and entry["rank"] == 4
    assert abs(entry["norm"] - expected) <= 1e-5 * expected  # float64 of the same float32 tensors
