"""WaveFT (``WaveFTConfig``): the wavelet update against a plain loop implementation of the inverse transform and
against the reference's own ``waverec2d``, the activation-side forward against the dense ``ΔW`` (values and
gradients), interop with the reference both ways (tiny Llama, BERT, GPT-2 ``Conv1D``, a custom MLP), merging,
several adapters, mixed batches and typed config errors.

The generic properties (identity at init, save/load, multi-adapter, bad inputs) come from the conformance suite.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from method_interop import check_interop_both_ways, interop_case
from numerics import TINY_MODEL_REDUCTION, fp_tol
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.waveft import WaveFTLayer, default_waveft_targets
from peftkit.methods.waveft.transform import (
    _WaveApply,
    wave_plan,
    waveft_apply,
    waveft_apply_plain,
    waveft_delta,
)
from peftkit.methods.waveft.wavelets import WAVELET_FAMILIES, rec_hi, rec_lo

#: both libraries run the same model; peftkit applies the update to the activations, the reference multiplies by
#: the dense ΔW: a few ulp per term of the longest reductions of the tiny models (tests/numerics.py)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)


# ------------------------------------------------------------------------------------------------ plain reference


def plain_delta(spectrum: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, out: int, inp: int,
                scaling: float, family: str | None) -> torch.Tensor:
    """``ΔW: (out, in)`` in float64 from the paper's recipe written with loops: the coefficients at their positions
    of the ``(P, Q)`` matrix padded by ``L - 2`` (to even) and centred, read as ``[[cA, cH], [cV, cD]]``; every
    sub-band coefficient ``c`` at ``(a, b)`` adds ``c · f_rows[t] · f_cols[u]`` at ``(2a + t, 2b + u)``; the result
    loses ``(2L - 3) // 2`` per side and the centre ``(out, in)`` is kept, times ``scaling``."""
    if family is None:
        dense = torch.zeros(out, inp, dtype=torch.float64)
        for k in range(spectrum.numel()):
            dense[rows[k], cols[k]] += float(spectrum[k])
        return dense * scaling
    lo, hi = rec_lo(family), rec_hi(family)
    length = len(lo)
    big_p, big_q = out + length - 2, inp + length - 2
    big_p, big_q = big_p + big_p % 2, big_q + big_q % 2
    h2, w2 = big_p // 2, big_q // 2
    full = torch.zeros(big_p + length - 2, big_q + length - 2, dtype=torch.float64)
    for k in range(spectrum.numel()):
        p, q = int(rows[k]) + (big_p - out) // 2, int(cols[k]) + (big_q - inp) // 2
        f_rows = hi if q >= w2 else lo  # cH (top right) and cD: highpass down the rows
        f_cols = hi if p >= h2 else lo  # cV (bottom left) and cD: highpass along the columns
        a, b = p % h2, q % w2
        for t in range(length):
            for u in range(length):
                full[2 * a + t, 2 * b + u] += float(spectrum[k]) * f_rows[t] * f_cols[u]
    trim = (2 * length - 3) // 2
    full = full[trim: full.shape[0] - trim, trim: full.shape[1] - trim]
    top, left = (full.shape[0] - out) // 2, (full.shape[1] - inp) // 2
    return full[top: top + out, left: left + inp] * scaling


def _layers(model: nn.Module) -> list[WaveFTLayer]:
    return [m for m in model.modules() if isinstance(m, WaveFTLayer)]


def _conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)  # weight (nx, nf) = (in, out)


def _single(base: nn.Module, **kwargs: Any) -> tuple[nn.Module, WaveFTLayer]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out on Conv1D
        model = peftkit.get_peft_model(nn.Sequential(base), peftkit.WaveFTConfig(target_modules=["0"], **kwargs))
    return model, _layers(model)[0]


@pytest.mark.parametrize(("kind", "family", "out", "inp"), [
    ("linear", "db1", 12, 10), ("linear", "db1", 9, 7), ("linear", "sym2", 11, 8), ("conv1d", "coif1", 12, 10),
    ("conv1d", "db3", 7, 9), ("linear", None, 9, 6)])
def test_layer_output_is_base_plus_plain_wavelet_update(kind: str, family: str | None, out: int, inp: int) -> None:
    torch.manual_seed(0)
    n, scaling, seed = 30, 7.0, 5
    base = nn.Linear(inp, out) if kind == "linear" else _conv1d(inp, out)
    _, layer = _single(base, n_frequency=n, scaling=scaling, random_loc_seed=seed, wavelet_family=family or "db1",
                       use_idwt=family is not None, init_weights=False)
    # the positions: the first n of a seeded randperm over out*in, row-major (the reference's draw)
    flat = torch.randperm(out * inp, generator=torch.Generator().manual_seed(seed))[:n]
    assert torch.equal(layer.waveft_indices["default"], torch.stack([flat // inp, flat % inp]))
    spectrum = layer.waveft_spectrum["default"].detach()
    delta = plain_delta(spectrum, flat // inp, flat % inp, out, inp, scaling, family)
    w = base.weight.double() if kind == "linear" else base.weight.double().T  # (out, in)
    x = torch.randn(3, 4, inp)
    expected = x.double() @ (w + delta).T + base.bias.double()
    # float32 layer against float64: a short correlation, n products and a short transposed convolution
    torch.testing.assert_close(layer(x).double(), expected, **fp_tol(torch.float32, inp + n + out))
    torch.testing.assert_close(layer.get_delta_weight("default").double(), delta if kind == "linear" else delta.T,
                               **fp_tol(torch.float32, 64))


@pytest.mark.parametrize("family", [f for f in WAVELET_FAMILIES if f in ("db1", "db4", "sym3", "coif2", "db10")])
@pytest.mark.parametrize(("out", "inp"), [(8, 8), (7, 10), (1, 5)])
def test_delta_and_activation_path_match_the_references_waverec2d(family: str, out: int, inp: int) -> None:
    """``waveft_delta`` and ``x ΔWᵀ`` on the activations against the reference's own ``waverec2d`` (its
    ``get_delta_weight`` recipe, written out here), in float64, odd and even sides, short and long filters."""
    from peft.tuners.waveft.waverec2d import waverec2d

    gen = torch.Generator().manual_seed(out * 10 + inp)
    n = max(1, out * inp // 2)
    flat = torch.randperm(out * inp, generator=gen)[:n]
    indices = torch.stack([flat // inp, flat % inp])
    spectrum = torch.randn(n, generator=gen, dtype=torch.float64)
    big_p, big_q = out + len(rec_lo(family)) - 2, inp + len(rec_lo(family)) - 2
    big_p, big_q = big_p + big_p % 2, big_q + big_q % 2
    dense = torch.zeros(big_p, big_q, dtype=torch.float64)
    dense[indices[0] + (big_p - out) // 2, indices[1] + (big_q - inp) // 2] = spectrum
    h2, w2 = big_p // 2, big_q // 2
    full = waverec2d((dense[:h2, :w2], (dense[:h2, w2:], dense[h2:, :w2], dense[h2:, w2:])), family) * 3.0
    top, left = (full.shape[0] - out) // 2, (full.shape[1] - inp) // 2
    expected = full[top: top + out, left: left + inp]
    # float64, sums of at most L² products per entry
    torch.testing.assert_close(waveft_delta(spectrum, indices, (out, inp), 3.0, family), expected,
                               **fp_tol(torch.float64, 4 * len(rec_lo(family)) ** 2))
    x = torch.randn(5, inp, generator=gen, dtype=torch.float64)
    applied = waveft_apply(x, spectrum, wave_plan(indices, (out, inp), family), 3.0)
    torch.testing.assert_close(applied, x @ expected.T, **fp_tol(torch.float64, inp * len(rec_lo(family)) ** 2))


@pytest.mark.parametrize("family", ["db1", "sym2", None])
def test_custom_backward_matches_gradcheck_and_plain_autograd(family: str | None) -> None:
    gen = torch.Generator().manual_seed(0)
    for out, inp in ((6, 5), (5, 8), (8, 8)):
        flat = torch.randperm(out * inp, generator=gen)[: out * inp // 2]
        plan = wave_plan(torch.stack([flat // inp, flat % inp]), (out, inp), family)
        x = torch.randn(7, inp, generator=gen, dtype=torch.float64, requires_grad=True)
        s = torch.randn(flat.numel(), generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, s, plan=plan: _WaveApply.apply(x, s, plan, 3.0), (x, s))
        g = torch.randn(7, out, generator=gen, dtype=torch.float64)
        ours = torch.autograd.grad(waveft_apply(x, s, plan, 3.0), (x, s), g)
        plain = torch.autograd.grad(waveft_apply_plain(x, s, plan, 3.0), (x, s), g)
        for a, b in zip(ours, plain):
            torch.testing.assert_close(a, b, **fp_tol(torch.float64, out * inp))


@pytest.mark.parametrize("family", ["db1", "coif1"])
def test_empty_batch_gives_an_empty_output(family: str) -> None:
    _, layer = _single(nn.Linear(9, 7), n_frequency=20, wavelet_family=family, init_weights=False)
    x = torch.zeros(0, 3, 9, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 3, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_backward_keeps_no_weight_sized_tensor() -> None:
    """The reference keeps the dense ``ΔW: (out, in)`` (and the stacked sub-bands) per layer for backward; peftkit
    keeps ``x`` and the spectrum only (besides the base weight, which the base matmul keeps without a copy)."""
    base = nn.Linear(256, 512, bias=False).requires_grad_(False)
    _, layer = _single(base, n_frequency=100, wavelet_family="sym2")
    x = torch.randn(4, 256, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert sorted(t.numel() for t in saved if t.data_ptr() != base.weight.data_ptr()) == [100, 4 * 256]
    out.sum().backward()
    assert x.grad is not None and layer.waveft_spectrum["default"].grad is not None


def test_default_init_is_exact_identity_and_random_init_is_small() -> None:
    model = interop_case("llama-causal").build().eval()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        zero = peftkit.get_peft_model(model, peftkit.WaveFTConfig(n_frequency=50, target_modules=["q_proj"]))
        torch.testing.assert_close(zero(ids).logits, expected, atol=0, rtol=0)  # base + 0 exactly
        zero.add_adapter("rand", peftkit.WaveFTConfig(n_frequency=50, target_modules=["q_proj"], init_weights=False))
    spectrum = _layers(zero)[0].waveft_spectrum["rand"]
    assert 0 < float(spectrum.abs().max()) < 0.06  # 0.01 · N(0, 1): the reference's std


# ------------------------------------------------------------------------------------------------ interop
INTEROP = [
    pytest.param("llama-causal", {"target_modules": ["q_proj", "v_proj", "up_proj"], "n_frequency": 40,
                                  "n_frequency_pattern": {"up_proj": 90}}, id="llama"),
    pytest.param("llama-causal", {"n_frequency": 30, "wavelet_family": "sym3", "random_loc_seed": 5}, id="llama-sym3"),
    pytest.param("llama-causal", {"n_frequency": 25, "use_idwt": False}, id="llama-no-idwt"),
    pytest.param("bert-feat", {"target_modules": ["query", "value", "intermediate.dense"], "n_frequency": 32,
                               "wavelet_family": "coif1"}, id="bert"),
    pytest.param("gpt2-causal", {"target_modules": ["c_attn", "mlp.c_proj"], "n_frequency": 48,
                                 "n_frequency_pattern": {"c_attn": 20}, "wavelet_family": "db2"}, id="gpt2-conv1d"),
    pytest.param("custom-mlp", {"target_modules": ["lin0", "lin1"], "n_frequency": 16, "bias": "waveft_only",
                                "wavelet_family": "db3", "scaling": 5.0}, id="mlp"),
]
ESSENTIALS = ("n_frequency", "scaling", "wavelet_family", "use_idwt", "random_loc_seed", "init_weights",
              "n_frequency_pattern", "proportional_parameters", "bias", "fan_in_fan_out")


@pytest.mark.interop
@pytest.mark.parametrize(("case_name", "kwargs"), INTEROP)
def test_interop_both_ways(case_name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """Perturbed (non-identity) adapters: the saved files have the same keys, shapes, dtypes and config essentials,
    and each library loads the other's file with the saver's outputs (1e-5)."""
    case = interop_case(case_name)
    kw = {"target_modules": list(case.target_modules), "task_type": case.task_type, "scaling": 30.0, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference warns about fan_in_fan_out on Conv1D
        check_interop_both_ways(case, lambda lib: lib.WaveFTConfig(**kw), tmp_path, markers=("waveft_",),
                                essentials=ESSENTIALS)  # INTEROP_TOL: 1e-5


# ------------------------------------------------------------------------------------------------ merging


def _perturbed(case_name: str, lib: Any, **kwargs: Any) -> nn.Module:
    from method_interop import perturb_adapter

    case = interop_case(case_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lib.get_peft_model(case.build().eval(), lib.WaveFTConfig(
            target_modules=list(case.target_modules), n_frequency=40, scaling=20.0, **kwargs)).eval()
    perturb_adapter(model, ("waveft_",), seed=3)
    return model


@pytest.mark.parametrize(("case_name", "family"), [("llama-causal", "coif1"), ("gpt2-causal", "db1"),
                                                   ("gpt2-causal", "sym2")])
def test_merge_keeps_the_outputs_and_matches_the_references_merge(case_name: str, family: str) -> None:
    """Merged and unmerged outputs equal the unmerged ones, and ``merge_and_unload`` gives the reference's weights
    (the same 2-D transform; ``W + ΔW`` rounded once)."""
    import peft
    from method_interop import case_output

    case = interop_case(case_name)
    model, ref = _perturbed(case_name, peftkit, wavelet_family=family), _perturbed(case_name, peft, wavelet_family=family)
    missing = ref.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(k.endswith("lm_head.weight") for k in missing)  # GPT-2's lm_head is tied to the embeddings
    expected = case_output(model, case)
    for step in (model.merge_adapter, model.unmerge_adapter):
        step()
        torch.testing.assert_close(case_output(model, case), expected, **TOL)
    ours, theirs = model.merge_and_unload(), ref.merge_and_unload()
    assert not _layers(ours)
    torch.testing.assert_close(case_output(ours, case), expected, **TOL)
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **fp_tol(torch.float32, 4), msg=n)


def test_two_active_adapters_add_their_updates() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=False)
    model, layer = _single(base, n_frequency=10, scaling=5.0, init_weights=False)
    model.add_adapter("b", peftkit.WaveFTConfig(n_frequency=7, scaling=3.0, random_loc_seed=1, wavelet_family="sym2",
                                                target_modules=["0"], init_weights=False))
    model.base_model.set_adapter(["default", "b"])
    deltas = []
    for name, scaling, family in (("default", 5.0, "db1"), ("b", 3.0, "sym2")):
        rows, cols = layer.waveft_indices[name]
        deltas.append(plain_delta(layer.waveft_spectrum[name].detach(), rows, cols, 6, 8, scaling, family))
    x = torch.randn(4, 8)
    expected = x.double() @ (base.weight.double() + deltas[0] + deltas[1]).T
    torch.testing.assert_close(layer(x).double(), expected, **fp_tol(torch.float32, 8 * 6))


def test_mixed_batch_rows_match_single_adapter_runs() -> None:
    """Row ``i`` goes through ``names[i]`` only (``__base__``: none): one layer, two adapters of other families."""
    model, layer = _single(nn.Linear(10, 12), n_frequency=20, init_weights=False, scaling=50.0)
    model.add_adapter("b", peftkit.WaveFTConfig(n_frequency=15, scaling=50.0, wavelet_family="sym2",
                                                target_modules=["0"], init_weights=False))
    model.eval()
    x = torch.randn(3, 4, 10)
    names = ["b", "__base__", "default"]
    with torch.no_grad(), model.base_model.mixed_batch(names):
        mixed = layer(x)
    base = layer.get_base_layer()
    for row, name in enumerate(names):
        delta = 0 if name == "__base__" else layer.apply_update(name, x[row])
        # the same kernels on one row as on the gathered rows
        torch.testing.assert_close(mixed[row], base(x[row]) + delta, **fp_tol(torch.float32, 12))
    assert not torch.allclose(mixed[0], mixed[2])


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"n_frequency": 0}, "n_frequency"),
    ({"n_frequency": 2.5}, "n_frequency"),
    ({"scaling": "big"}, "scaling"),
    ({"wavelet_family": "haar"}, "wavelet_family"),
    ({"random_loc_seed": None}, "random_loc_seed"),
    ({"use_idwt": "yes"}, "use_idwt"),
    ({"bias": "some"}, "bias"),
    ({"init_weights": 1}, "init_weights"),
    ({"n_frequency_pattern": {"q_proj": 0}}, "n_frequency_pattern"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"target_modules": ".*proj", "layers_to_transform": [0]}, "layers_to_transform"),
])
def test_bad_config_values_raise_config_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        peftkit.WaveFTConfig(**kwargs)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("family", ["db11", "sym20", "coif5", "coif17"])
def test_families_the_reference_cannot_run_are_refused_at_config_time(family: str) -> None:
    """The reference's config accepts every name of its reduction table, but has filters only for db1-db10,
    sym2-sym10 and coif1-coif5, and 48 values for coif5's 30 taps: its first forward raises (unknown wavelet, or a
    matmul shape mismatch). peftkit refuses these names when the config is built, naming the field."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(nn.Sequential(nn.Linear(40, 40)), peft.WaveFTConfig(
            n_frequency=10, wavelet_family=family, target_modules=["0"]))
    with pytest.raises((ValueError, RuntimeError)):
        ref(torch.randn(2, 40))
    with pytest.raises(ConfigError, match="wavelet_family") as info:
        peftkit.WaveFTConfig(wavelet_family=family)
    assert isinstance(info.value, ValueError) and "coif4" in str(info.value)


@pytest.mark.parametrize(("kwargs", "field"), [({"n_frequency": 201}, "n_frequency"),
                                               ({"n_frequency_pattern": {"lin0": 201}}, "n_frequency_pattern")])
def test_more_coefficients_than_weight_entries_raise(kwargs: dict, field: str) -> None:
    from models import MLP

    with pytest.raises(ConfigError, match=f"{field}.*201.*200"):
        peftkit.get_peft_model(MLP(), peftkit.WaveFTConfig(target_modules=["lin0"], **{"n_frequency": 10, **kwargs}))


@pytest.mark.parametrize(("case_name", "targets", "n"), [("custom-mlp", ["lin0", "lin1"], 10),
                                                       ("llama-causal", ["q_proj", "k_proj", "up_proj"], 30)])
def test_proportional_parameters_match_the_reference_allocation(case_name: str, targets: list[str], n: int,
                                                                tmp_path: Path) -> None:
    """``proportional_parameters``: ``n_frequency · #layers`` spread over the layers by ``out · in`` (rounded, at
    least 1; it overrides ``n_frequency_pattern``), the same counts as the reference's, and files move both ways."""
    import peft

    kw = {"target_modules": targets, "n_frequency": n, "proportional_parameters": True,
          "n_frequency_pattern": {targets[0]: 3}, "task_type": interop_case(case_name).task_type}
    ours, ref = check_interop_both_ways(case_name, lambda lib: lib.WaveFTConfig(**kw), tmp_path,
                                        markers=("waveft_",), essentials=ESSENTIALS)
    counts = {name: layer.waveft_n_frequency["default"] for name, layer in ours.named_modules()
              if isinstance(layer, WaveFTLayer)}
    theirs = {name: m.waveft_n_frequency["default"] for name, m in ref.named_modules()
              if isinstance(m, peft.tuners.waveft.WaveFTLayer)}
    sizes = {name: layer.get_base_layer().weight.numel() for name, layer in ours.named_modules()
             if isinstance(layer, WaveFTLayer)}
    total = sum(sizes.values())
    assert counts == theirs == {k: max(1, round(v / total * n * len(sizes))) for k, v in sizes.items()}
    assert len(set(counts.values())) > 1  # the allocation really differs per layer


def test_proportional_parameters_more_than_a_layer_holds_raise() -> None:
    from models import MLP

    config = peftkit.WaveFTConfig(target_modules=["lin0", "lin1"], n_frequency=150, proportional_parameters=True)
    with pytest.raises(ConfigError, match="proportional_parameters.*250.*200"):  # 200 / 240 of a 300 budget
        peftkit.get_peft_model(MLP(), config)


def test_conv1d_layers_get_fan_in_fan_out_without_changing_the_users_config() -> None:
    """The reference flips ``config.fan_in_fan_out`` in place for GPT-2 ``Conv1D``; peftkit records it per layer
    and in its stored copy (the saved file says True, as the reference's) and leaves the user's config as given."""
    config = peftkit.WaveFTConfig(n_frequency=16, target_modules=["c_attn"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peftkit.get_peft_model(interop_case("gpt2-causal").build(), config)
    assert config.fan_in_fan_out is False and model.peft_config["default"].fan_in_fan_out is True
    assert all(layer.fan_in_fan_out for layer in _layers(model))


def test_unsupported_module_raises_typed_error() -> None:
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        peftkit.get_peft_model(nn.Sequential(nn.Embedding(10, 4)), peftkit.WaveFTConfig(
            n_frequency=4, target_modules=["0"]))


def test_default_targets_are_the_reference_table() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING as TABLE

    for model_type, targets in TABLE.items():
        expected = targets if isinstance(targets, str) else set(targets)
        assert default_waveft_targets(model_type) == expected, model_type
    assert default_waveft_targets("rwkv") is None and default_waveft_targets("btlm") is None


@pytest.mark.parametrize("use_idwt", [True, False])
def test_inspect_strength_is_the_delta_norm_for_haar_on_even_sides(use_idwt: bool) -> None:
    """``peftkit inspect`` measures ``scaling · ‖spectrum‖``: ``‖ΔW‖_F`` exactly where the transform is orthonormal
    (Haar on even sides, or no IDWT)."""
    from peftkit.methods.waveft import WAVEFT

    _, layer = _single(nn.Linear(10, 8), n_frequency=30, scaling=3.0, use_idwt=use_idwt, init_weights=False)
    spectrum = layer.waveft_spectrum["default"].detach()
    shape, rank, strength, _ = WAVEFT.update_strength({"waveft_spectrum": spectrum}, {"scaling": 3.0})
    assert shape == [30] and rank is None
    # float32 ΔW: 30 coefficients, each spread over at most 4 entries
    assert strength == pytest.approx(float(layer.get_delta_weight("default").double().norm()), rel=1e-5)
