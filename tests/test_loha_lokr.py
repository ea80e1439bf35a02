"""LoHa and LoKr: the dense updates against formulas computed here from the saved tensors, shapes and init,
dropout, mixed batches, unsupported modules, and interop both ways with the reference (tiny Llama, T5, Conv1d and
Conv2d models).

The generic properties (identity, merge, save/load, multi-adapter, errors) come from the conformance suite, which
parametrizes both methods over the tiny models whose target kinds they support (``MethodSpec.supported_kinds``).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from models import CASES_BY_NAME, TASK_CASES, model_output
from numerics import TINY_MODEL_REDUCTION, fp_tol
from safetensors.torch import load_file

from peftkit import LoHaConfig, LoKrConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.layers.dispatch import module_kind
from peftkit.methods.lokr.layers import factorization
from peftkit.registry import get_method

sys.path.insert(0, str(Path(__file__).parent / "conformance"))
from conformance_helpers import case_kinds

ATOL = 1e-5


def _wrap(case_name: str, config, seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(CASES_BY_NAME[case_name].build().eval(), config).eval()


def _out(model, case_name: str, batch: int = 2) -> torch.Tensor:
    case = CASES_BY_NAME[case_name]
    with torch.no_grad():
        return model_output(model(**case.make_inputs(batch)), case.output_key)


def _layer(model: PeftModel, suffix: str):
    return next(m for n, m in model.named_modules() if n.endswith(suffix) and hasattr(m, "adapter_layer_names"))


# ------------------------------------------------------------------------------------------------ registry


def test_case_target_kinds_match_the_built_models() -> None:
    """The conformance suite's table of target kinds per case (used with ``supported_kinds``) is right."""
    for case in TASK_CASES:
        model = case.build()
        kinds = {module_kind(m) for n, m in model.named_modules()
                 if any(n == t or n.endswith("." + t) for t in case.target_modules)}
        assert kinds == set(case_kinds(case)), case.name


def test_registration() -> None:
    loha, lokr = get_method("LOHA"), get_method("LOKR")
    assert (loha.prefix, loha.tuner_name, lokr.prefix, lokr.tuner_name) == ("hada_", "LoHaModel", "lokr_", "LoKrModel")
    assert LoHaConfig().r == 8 and LoHaConfig().alpha == 8 and LoKrConfig().decompose_factor == -1
    with pytest.raises(ConfigError, match="decompose_factor"):
        LoKrConfig(decompose_factor=0)
    with pytest.raises(ConfigError, match="init_weights"):
        LoHaConfig(init_weights="lycoris")


def test_factorization_matches_the_documented_rule() -> None:
    assert [factorization(256), factorization(128), factorization(127), factorization(128, 4)] == [
        (16, 16), (8, 16), (1, 127), (4, 32)]
    assert factorization(12, 5) == (3, 4)  # 5 does not divide: closest pair with m <= 5


def test_unsupported_modules_raise() -> None:
    for cls in (LoHaConfig, LoKrConfig):
        with pytest.raises(UnsupportedModuleError, match="nn.Linear, nn.Conv1d and nn.Conv2d"):
            _wrap("custom-emb", cls(target_modules=["emb"]))
        with pytest.raises(UnsupportedModuleError, match="Conv1D"):
            _wrap("gpt2-causal", cls(target_modules=["c_attn"], task_type="CAUSAL_LM"))


# ------------------------------------------------------------------------------------------------ math


def test_loha_linear_is_the_scaled_hadamard_product() -> None:
    model = _wrap("custom-mlp", LoHaConfig(target_modules=["lin0"], r=3, alpha=6, init_weights=False))
    sd = get_peft_model_state_dict(model)
    p = "base_model.model.lin0."
    w1a, w1b, w2a, w2b = (sd[p + k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    layer = _layer(model, "lin0")
    out_f, in_f = layer.get_base_layer().weight.shape
    assert (w1a.shape, w1b.shape) == ((out_f, 3), (3, in_f)) and set(sd) == {p + k for k in (
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    expected = (w1a @ w1b) * (w2a @ w2b) * 2.0
    # peftkit's kernel vs the formula written out: two rank-3 products
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, **fp_tol(torch.float32, 2 * 3))
    x = torch.randn(5, in_f)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + x @ expected.T, atol=1e-5, rtol=0)


def test_loha_default_init_is_identity_and_zeroes_w2_b_only() -> None:
    model = _wrap("custom-mlp", LoHaConfig(target_modules=["lin0"]))
    layer = _layer(model, "lin0")
    assert torch.count_nonzero(layer.hada_w2_b["default"]) == 0
    assert all(torch.count_nonzero(getattr(layer, k)["default"]) > 0 for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a"))
    assert torch.count_nonzero(layer.get_delta_weight("default")) == 0


def test_loha_effective_conv2d_is_the_cp_rebuild() -> None:
    model = _wrap("custom-conv2d", LoHaConfig(target_modules=["conv"], r=2, alpha=3, use_effective_conv2d=True,
                                              init_weights=False))
    layer = _layer(model, "conv")
    base = layer.get_base_layer()
    t1, t2 = layer.hada_t1["default"], layer.hada_t2["default"]
    w1a, w1b, w2a, w2b = (getattr(layer, k)["default"] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    assert t1.shape == (2, 2, 3, 3) and w1a.shape == (2, 8) and w1b.shape == (2, 3)
    expected = torch.zeros_like(base.weight)
    for o in range(8):
        for i in range(3):
            r1 = (w1a[:, o, None, None, None] * w1b[None, :, i, None, None] * t1).sum((0, 1))
            r2 = (w2a[:, o, None, None, None] * w2b[None, :, i, None, None] * t2).sum((0, 1))
            expected[o, i] = r1 * r2 * 1.5
    # peftkit's einsum vs the loop: two sums over rank 2 x rank 2
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, **fp_tol(torch.float32, 2 * 2 * 2))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + F.conv2d(x, expected, padding=1), atol=1e-5, rtol=0)


def _kron_dense(w1: torch.Tensor, w2: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``ΔW[a·B + b, c·D + d, ...] = w1[a, c] · w2[b, d, ...]`` (w2 reshaped to ``(B, D, *kernel)``)."""
    a, c = w1.shape
    w2 = w2.reshape(shape[0] // a, shape[1] // c, *shape[2:])
    out = torch.einsum("ac,bd...->abcd...", w1, w2)
    return out.reshape(shape)


def test_lokr_linear_is_the_kronecker_product_with_low_rank_factors() -> None:
    model = _wrap("custom-mlp", LoKrConfig(target_modules=["lin0"], r=1, alpha=3, decompose_both=True,
                                           init_weights=False))
    layer = _layer(model, "lin0")
    base = layer.get_base_layer()
    out_f, in_f = base.weight.shape
    (a, b), (c, d) = factorization(out_f), factorization(in_f)
    sd = {k.split("lin0.")[1]: v for k, v in get_peft_model_state_dict(model).items()}
    # decompose_both with r < max(a, c)/2 makes w1 low rank; r < max(b, d)/2 makes w2 low rank
    assert set(sd) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}, (a, b, c, d)
    assert sd["lokr_w1_a"].shape == (a, 1) and sd["lokr_w2_b"].shape == (1, d)
    w1, w2 = sd["lokr_w1_a"] @ sd["lokr_w1_b"], sd["lokr_w2_a"] @ sd["lokr_w2_b"]
    expected = _kron_dense(w1, w2, base.weight.shape) * 3.0
    # peftkit's kron vs the dense one written out: rank-1 factors, then a product
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, **fp_tol(torch.float32, 2))
    x = torch.randn(4, in_f)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ expected.T, atol=1e-5, rtol=0)


@pytest.mark.parametrize("r", [8, 1])
def test_lokr_conv2d_kernels(r: int) -> None:
    """Conv2d(3, 8, 3): full ``w2: (b, d, 3, 3)`` for a large r, else ``w2_a @ w2_b`` with ``d·9`` columns."""
    model = _wrap("custom-conv2d", LoKrConfig(target_modules=["conv"], r=r, alpha=r, init_weights=False))
    layer = _layer(model, "conv")
    base = layer.get_base_layer()
    w1 = layer.lokr_w1["default"]
    (a, b), (c, d) = factorization(8), factorization(3)
    assert w1.shape == (a, c)
    if r == 8:
        w2 = layer.lokr_w2["default"]
        assert w2.shape == (b, d, 3, 3)
    else:
        w2 = layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]
        assert layer.lokr_w2_b["default"].shape == (1, d * 9)
    expected = _kron_dense(w1, w2, base.weight.shape)
    # peftkit's kron vs the dense one written out: w2 = w2_a @ w2_b sums over r
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, **fp_tol(torch.float32, r))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + F.conv2d(x, expected, padding=1), atol=1e-5, rtol=0)


def test_lokr_default_init_zeroes_w1_and_lycoris_init_zeroes_w2() -> None:
    layer = _layer(_wrap("custom-mlp", LoKrConfig(target_modules=["lin0"])), "lin0")
    assert torch.count_nonzero(layer.lokr_w1["default"]) == 0 and torch.count_nonzero(layer.lokr_w2["default"]) > 0
    layer = _layer(_wrap("custom-mlp", LoKrConfig(target_modules=["lin0"], init_weights="lycoris")), "lin0")
    assert torch.count_nonzero(layer.lokr_w1["default"]) > 0 and torch.count_nonzero(layer.lokr_w2["default"]) == 0


@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
def test_merge_equals_unmerged_and_dropout_in_training(cls) -> None:
    model = _wrap("custom-conv2d", cls(target_modules=["conv", "lin0"], init_weights=False, alpha=16,
                                       module_dropout=1.0))
    with model.disable_adapter():
        base = _out(model, "custom-conv2d")
    adapted = _out(model, "custom-conv2d")
    assert (adapted - base).abs().max() > 1e-4
    model.train()  # module_dropout=1.0: every adapter skipped in training
    torch.testing.assert_close(_out(model, "custom-conv2d"), base, atol=1e-6, rtol=0)
    model.eval()
    merged = model.merge_and_unload()
    torch.testing.assert_close(_out(merged, "custom-conv2d"), adapted, atol=ATOL, rtol=0)


def test_rank_dropout_zeroes_rows_in_training_only() -> None:
    model = _wrap("custom-mlp", LoHaConfig(target_modules=["lin0"], init_weights=False, rank_dropout=0.5))
    layer = _layer(model, "lin0")
    torch.manual_seed(3)
    dropped = layer._delta("default", apply_rank_dropout=True)
    full = layer.get_delta_weight("default")
    zero_rows = (dropped.abs().sum(1) == 0)
    assert 0 < int(zero_rows.sum()) < full.shape[0]
    keep = ~zero_rows  # LoHa rescales the kept rows by 1 / keep-fraction, as the reference
    # the rescale is applied inside the rank-8 products there, after them here
    torch.testing.assert_close(dropped[keep], full[keep] * (full.shape[0] / int(keep.sum())),
                               **fp_tol(torch.float32, 2 * 8))


@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
def test_mixed_batch_rows_use_their_own_adapter(cls) -> None:
    model = _wrap("custom-conv2d", cls(target_modules=["conv", "lin0"], init_weights=False, alpha=16))
    torch.manual_seed(1)
    model.add_adapter("other", cls(target_modules=["conv", "lin0"], init_weights=False, alpha=16))
    case = CASES_BY_NAME["custom-conv2d"]
    inputs = case.make_inputs(3)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["other", "__base__", "default"])
        singles = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            singles[name] = model(**inputs)
        with model.disable_adapter():
            singles["__base__"] = model(**inputs)
    for row, name in enumerate(["other", "__base__", "default"]):
        # the mixed-batch path (per-row deltas) vs one adapter for the batch: a tiny-model forward
        torch.testing.assert_close(mixed[row], singles[name][row], **fp_tol(torch.float32, TINY_MODEL_REDUCTION))


# ------------------------------------------------------------------------------------------------ interop

INTEROP = [
    pytest.param("llama-causal", "LOHA", {"r": 4, "alpha": 8}, id="loha-llama"),
    pytest.param("t5-seq2seq", "LOHA", {"r": 4, "alpha": 8, "rank_dropout": 0.1}, id="loha-t5"),
    pytest.param("t5-seq2seq", "LOKR", {"r": 2, "alpha": 4}, id="lokr-t5"),
    pytest.param("t5-seq2seq", "LOKR", {"r": 2, "alpha": 4, "decompose_both": True, "decompose_factor": 4},
                 id="lokr-t5-decompose"),
    pytest.param("custom-conv2d", "LOHA", {"r": 2, "alpha": 4, "use_effective_conv2d": True,
                                           "target_modules": ["conv", "lin0"]}, id="loha-conv2d-effective"),
    pytest.param("llama-causal", "LOKR", {"r": 1, "alpha": 2, "decompose_both": True, "decompose_factor": 4},
                 id="lokr-llama-decompose"),
    pytest.param("custom-conv2d", "LOKR", {"r": 1, "alpha": 2, "use_effective_conv2d": True,
                                           "target_modules": ["conv", "lin0"]}, id="lokr-conv2d-effective"),
    pytest.param("custom-conv2d", "LOKR", {"r": 8, "alpha": 4, "decompose_factor": 2,
                                           "target_modules": ["conv"]}, id="lokr-conv2d-full"),
    pytest.param("custom-conv1d", "LOKR", {"r": 8, "alpha": 4}, id="lokr-conv1d-full"),
    pytest.param("custom-conv1d", "LOHA", {"r": 2, "alpha": 4, "use_effective_conv2d": True}, id="loha-conv1d"),
]

ESSENTIALS = ("peft_type", "r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights",
              "decompose_both", "decompose_factor", "rank_dropout_scale")


def _configs(case_name: str, method: str, kwargs: dict):
    import peft

    case = CASES_BY_NAME[case_name]
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, "init_weights": False, **kwargs}
    ours = (LoHaConfig if method == "LOHA" else LoKrConfig)(**kw)
    ref = (peft.LoHaConfig if method == "LOHA" else peft.LoKrConfig)(**kw)
    return ours, ref


@pytest.mark.interop
@pytest.mark.parametrize("case_name, method, kwargs", INTEROP)
def test_interop_both_ways(case_name: str, method: str, kwargs: dict, tmp_path: Path) -> None:
    import peft

    ours_cfg, ref_cfg = _configs(case_name, method, kwargs)
    case = CASES_BY_NAME[case_name]
    ours = _wrap(case_name, ours_cfg, seed=0)
    torch.manual_seed(1)
    ref = peft.get_peft_model(case.build().eval(), ref_cfg).eval()
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")

    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    for key in ESSENTIALS:
        assert ca.get(key) == cb.get(key), key
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])

    # reference file -> peftkit, peftkit file -> reference: same outputs as the saver
    loaded = PeftModel.from_pretrained(case.build().eval(), tmp_path / "ref").eval()
    torch.testing.assert_close(_out(loaded, case_name), _out(ref, case_name), atol=ATOL, rtol=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref_loaded = peft.PeftModel.from_pretrained(case.build().eval(), tmp_path / "ours").eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    torch.testing.assert_close(_out(ref_loaded, case_name), _out(ours, case_name), atol=ATOL, rtol=0)
    assert (_out(ours, case_name) - _out(case.build().eval(), case_name)).abs().max() > 1e-6
    # the reference computes the same dense update from the same tensors
    for name, module in ref_loaded.named_modules():
        if hasattr(module, "get_delta_weight") and name.endswith(tuple(ours_cfg.target_modules)):
            ours_layer = ours.get_submodule(name)
            # peftkit vs the reference library: rank-8 products (LoHa two of them)
            torch.testing.assert_close(ours_layer.get_delta_weight("default"),
                                       module.get_delta_weight("default"), **fp_tol(torch.float32, 2 * 8))
