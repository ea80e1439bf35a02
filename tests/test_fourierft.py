"""FourierFT (``FourierFTConfig``): the spectral update against a plain cosine-sum implementation, interop with the
reference both ways (tiny Llama, BERT, GPT-2 ``Conv1D``, a custom MLP), merge/unmerge, several adapters, mixed
batches, the one-matmul forward against the reference's two, typed config errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from method_interop import (
    case_model,
    case_output,
    check_interop_both_ways,
    check_mixed_batch_rows,
    interop_case,
)
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnsupportedModuleError
from peftkit.methods.fourierft import FourierFTLayer, default_fourierft_targets
from tests.models import MLP
from tests.numerics import TINY_MODEL_REDUCTION, fp_tol

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft = pytest.importorskip("peft")

#: both libraries run the same model; peftkit adds ΔW to W before one matmul, the reference sums two matmuls, and
#: both run a float32 FFT: a few ulp per term of the longest reductions of the tiny models (tests/numerics.py)
TOL = fp_tol(torch.float32, TINY_MODEL_REDUCTION)
LLAMA = "llama-causal"  # the model case (tests/models.py) of the Llama tests


# ------------------------------------------------------------------------------------------------ plain reference


def plain_delta(spectrum: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, out: int, inp: int,
                scaling: float) -> torch.Tensor:
    """``Re(IFFT2(S)) · scaling`` written as the paper's cosine sum, in float64:
    ``ΔW[p, q] = scaling / (out · in) · Σ_k s_k cos(2π (p u_k / out + q v_k / in))``."""
    p = torch.arange(out, dtype=torch.float64)[:, None, None]
    q = torch.arange(inp, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (p * rows.double() / out + q * cols.double() / inp)  # (out, in, n)
    return (torch.cos(phase) * spectrum.double()).sum(-1) * scaling / (out * inp)


def _layers(model: nn.Module) -> list[FourierFTLayer]:
    return [m for m in model.modules() if isinstance(m, FourierFTLayer)]


def _conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)  # weight (nx, nf) = (in, out)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_output_is_base_plus_plain_spectral_update(kind: str) -> None:
    torch.manual_seed(0)
    out, inp, n, scaling, seed = 12, 10, 30, 7.0, 5
    base = nn.Linear(inp, out) if kind == "linear" else _conv1d(inp, out)
    model = peftkit.get_peft_model(nn.Sequential(base), peftkit.FourierFTConfig(
        n_frequency=n, scaling=scaling, random_loc_seed=seed, target_modules=["0"]))
    layer = _layers(model)[0]
    # the frequency locations: the first n of a seeded randperm over out*in, row-major (the reference's draw)
    flat = torch.randperm(out * inp, generator=torch.Generator().manual_seed(seed))[:n]
    assert torch.equal(layer.indices["default"], torch.stack([flat // inp, flat % inp]))
    spectrum = layer.fourierft_spectrum["default"].detach()
    delta = plain_delta(spectrum, flat // inp, flat % inp, out, inp, scaling)
    w = base.weight.double() if kind == "linear" else base.weight.double().T  # (out, in)
    x = torch.randn(3, 4, inp)
    expected = x.double() @ (w + delta).T + base.bias.double()
    # float32 layer against float64: a 10-term dot product after an FFT of 10 x 12 points
    torch.testing.assert_close(layer(x).double(), expected, **fp_tol(torch.float32, inp + out))
    torch.testing.assert_close(layer.get_delta_weight("default").double(), delta if kind == "linear" else delta.T,
                               **fp_tol(torch.float32, out * inp))


@pytest.mark.parametrize(("out", "inp"), [(6, 5), (5, 8), (8, 8), (1, 7), (9, 1)])
def test_half_spectrum_delta_matches_plain_and_dense_fft_in_values_and_gradients(out: int, inp: int) -> None:
    """The real half-spectrum inverse FFT against the cosine sum and the reference's dense complex ``ifft2``, for
    odd and even sides (the Nyquist column), with repeated frequency pairs ``(u, v)`` / ``(-u, -v)`` likely."""
    from peftkit.methods.fourierft.layers import fourier_delta, fourier_delta_reference, half_spectrum_plan

    gen = torch.Generator().manual_seed(out * 10 + inp)
    n = max(1, out * inp * 2 // 3)
    flat = torch.randperm(out * inp, generator=gen)[:n]
    rows, cols = flat // inp, flat % inp
    indices = torch.stack([rows, cols])
    spectrum = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    results = []
    for delta in (fourier_delta(spectrum, half_spectrum_plan(indices, (out, inp)), (out, inp), 3.0),
                  fourier_delta_reference(spectrum, indices, (out, inp), 3.0),
                  plain_delta(spectrum, rows, cols, out, inp, 3.0)):
        results.append((delta, *torch.autograd.grad(delta, spectrum, grad)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            # float64 FFTs and an n-term cosine sum: roundings grow with the out * in points summed
            torch.testing.assert_close(a, b, **fp_tol(torch.float64, out * inp))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_activation_fft_forward_matches_dense_delta_in_values_and_gradients(kind: str) -> None:
    """``x ΔWᵀ`` through FFTs of ``x`` against ``x @ ΔWᵀ`` with the reference's dense ``ΔW`` (both differentiated)."""
    from peftkit.methods.fourierft.layers import fourier_delta_reference

    torch.manual_seed(0)
    base = (nn.Linear(16, 24) if kind == "linear" else _conv1d(16, 24)).requires_grad_(False)
    layer = peftkit.get_peft_model(nn.Sequential(base), peftkit.FourierFTConfig(
        n_frequency=300, scaling=20.0, target_modules=["0"])).base_model.model[0]
    spectrum = layer.fourierft_spectrum["default"]
    x = torch.randn(2, 5, 16, requires_grad=True)
    g = torch.randn(2, 5, 24)
    ours = layer(x)
    w = base.weight if kind == "linear" else base.weight.T
    dense = x @ (w + fourier_delta_reference(spectrum, layer.indices["default"], (24, 16), 20.0)).T + base.bias
    for a, b in zip((ours, *torch.autograd.grad(ours, (x, spectrum), g)),
                    (dense, *torch.autograd.grad(dense, (x, spectrum), g))):
        # float32 FFTs of 16/24 points against a 16-term matmul; the spectrum gradient sums 10 rows of 24 x 16 terms
        torch.testing.assert_close(a, b, **fp_tol(torch.float32, 10 * 16 * 24))


def test_spectral_apply_gradcheck_and_plain_autograd() -> None:
    from peftkit.methods.fourierft.spectral import _SpectralApply, spectral_apply_plain, spectral_plan

    gen = torch.Generator().manual_seed(0)
    for out, inp in ((6, 5), (5, 8), (8, 8)):
        flat = torch.randperm(out * inp, generator=gen)[: out * inp // 2]
        plan = spectral_plan(torch.stack([flat // inp, flat % inp]), (out, inp))
        x = torch.randn(7, inp, generator=gen, dtype=torch.float64, requires_grad=True)
        s = torch.randn(flat.numel(), generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, s, plan=plan: _SpectralApply.apply(x, s, plan, 3.0), (x, s))
        g = torch.randn(7, out, generator=gen, dtype=torch.float64)
        ours = torch.autograd.grad(_SpectralApply.apply(x, s, plan, 3.0), (x, s), g)
        plain = torch.autograd.grad(spectral_apply_plain(x, s, plan, 3.0), (x, s), g)
        for a, b in zip(ours, plain):
            torch.testing.assert_close(a, b, **fp_tol(torch.float64, out * inp))


def test_backward_keeps_no_weight_sized_tensor() -> None:
    """The reference keeps the dense ``ΔW: (out, in)`` per layer for backward; peftkit keeps ``x`` and the spectrum."""
    base = nn.Linear(256, 512, bias=False).requires_grad_(False)
    layer = peftkit.get_peft_model(nn.Sequential(base), peftkit.FourierFTConfig(
        n_frequency=100, target_modules=["0"])).base_model.model[0]
    x = torch.randn(4, 256, requires_grad=True)
    sizes: list[int] = []
    weight_storage = base.weight.untyped_storage().data_ptr()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() != weight_storage:  # the base matmul keeps W itself (no copy)
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert sorted(sizes) == [100, 4 * 256], sizes  # the spectrum and x


def test_init_weights_true_is_exact_identity_and_default_is_not() -> None:
    model = case_model(LLAMA)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
        zero = peftkit.get_peft_model(model, peftkit.FourierFTConfig(
            n_frequency=50, target_modules=["q_proj", "v_proj"], init_weights=True))
        torch.testing.assert_close(zero(ids).logits, expected, atol=0, rtol=0)  # W + 0 == W, the same matmul
        zero.add_adapter("rand", peftkit.FourierFTConfig(n_frequency=50, target_modules=["q_proj", "v_proj"]))
        zero.set_adapter("rand")
        assert not torch.allclose(zero(ids).logits, expected, atol=1e-3)


# ------------------------------------------------------------------------------------------------ interop


#: model case (tests/models.py) -> (target_modules, n_frequency, n_frequency_pattern)
INTEROP_MODELS = {
    LLAMA: (["q_proj", "v_proj", "up_proj"], 64, {"up_proj": 100}),
    "bert-feat": (["query", "value", "intermediate.dense"], 32, {}),
    "gpt2-causal": (["c_attn", "mlp.c_proj"], 48, {"c_attn": 20}),
    "custom-mlp": (["lin0", "lin1"], 16, {}),
}


def _perturb(model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "fourierft_" in name:
                param.copy_(torch.randn(param.shape, generator=gen))


def _run(model: nn.Module, name: str) -> torch.Tensor:
    return case_output(model, interop_case(name))


def _config(lib, name: str, seed: int = 11):
    targets, n, pattern = INTEROP_MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference warns about fan_in_fan_out on Conv1D
        return lib.FourierFTConfig(n_frequency=n, scaling=30.0, random_loc_seed=seed, target_modules=targets,
                                   n_frequency_pattern=dict(pattern))


@pytest.mark.parametrize("seed", [11, 23])
@pytest.mark.parametrize("name", list(INTEROP_MODELS))
def test_interop_both_ways(name: str, seed: int, tmp_path) -> None:
    """Random spectra: the same saved keys, shapes, dtypes and config essentials, each library loads the other's
    file with the saver's outputs (1e-5), the same spectral locations from the seed; the adapter is not identity."""
    _, ref = check_interop_both_ways(
        name, lambda lib: _config(lib, name, seed), tmp_path, markers=None, perturb=_perturb, min_change=1e-3,
        essentials=("n_frequency", "scaling", "random_loc_seed", "init_weights", "n_frequency_pattern"))
    model = peftkit.PeftModel.from_pretrained(case_model(name), str(tmp_path / "ref"))
    theirs = [m for m in ref.modules() if hasattr(m, "fourierft_spectrum")]
    assert len(_layers(model)) == len(theirs) > 0
    for ours, layer in zip(_layers(model), theirs):
        assert torch.equal(ours.indices["default"], layer.indices["default"])


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("name", [LLAMA, "gpt2-causal"])
def test_merge_unmerge_and_merge_and_unload_match_unmerged_outputs(name: str) -> None:
    model = peftkit.get_peft_model(case_model(name), _config(peftkit, name)).eval()
    _perturb(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    expected = _run(model, name)
    model.merge_adapter()
    torch.testing.assert_close(_run(model, name), expected, **TOL)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:  # (W + ΔW) - ΔW: two roundings per element
            torch.testing.assert_close(p.detach(), weights[n], **fp_tol(torch.float32, 4))
    torch.testing.assert_close(_run(model, name), expected, **TOL)
    merged = model.merge_and_unload()
    assert not _layers(merged)
    torch.testing.assert_close(_run(merged, name), expected, **TOL)


@pytest.mark.parametrize("name", [LLAMA, "gpt2-causal"])
def test_merge_matches_reference_merge(name: str) -> None:
    model = peftkit.get_peft_model(case_model(name), _config(peftkit, name)).eval()
    _perturb(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(case_model(name), _config(peft, name)).eval()
    missing = ref.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert all(k.endswith("lm_head.weight") for k in missing)  # GPT-2's lm_head is tied to the embeddings
    ours, theirs = model.merge_and_unload(), ref.merge_and_unload()
    for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, **fp_tol(torch.float32, 4), msg=n)  # the same FFT, W + ΔW once


def test_two_active_adapters_add_their_updates() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=False)
    model = peftkit.get_peft_model(nn.Sequential(base), peftkit.FourierFTConfig(
        n_frequency=10, scaling=5.0, target_modules=["0"]))
    model.add_adapter("b", peftkit.FourierFTConfig(n_frequency=7, scaling=3.0, random_loc_seed=1,
                                                   target_modules=["0"]))
    model.base_model.set_adapter(["default", "b"])
    layer = _layers(model)[0]
    deltas = []
    for name, scaling in (("default", 5.0), ("b", 3.0)):
        rows, cols = layer.indices[name]
        deltas.append(plain_delta(layer.fourierft_spectrum[name].detach(), rows, cols, 6, 8, scaling))
    x = torch.randn(4, 8)
    expected = x.double() @ (base.weight.double() + deltas[0] + deltas[1]).T
    torch.testing.assert_close(layer(x).double(), expected, **fp_tol(torch.float32, 8 * 6))


def test_mixed_batch_rows_match_single_adapter_runs() -> None:
    model = peftkit.get_peft_model(case_model(LLAMA), _config(peftkit, LLAMA)).eval()
    _perturb(model, seed=3)
    model.add_adapter("other", _config(peftkit, LLAMA, seed=5))
    _perturb(model, seed=4)
    ids = torch.randint(3, 100, (3, 6), generator=torch.Generator().manual_seed(2))
    names = ["other", "__base__", "default"]
    check_mixed_batch_rows(model, {"input_ids": ids}, names, TOL)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"n_frequency": 0}, "n_frequency"),
    ({"n_frequency": 2.5}, "n_frequency"),
    ({"scaling": "big"}, "scaling"),
    ({"random_loc_seed": None}, "random_loc_seed"),
    ({"bias": "some"}, "bias"),
    ({"init_weights": "yes"}, "init_weights"),
    ({"n_frequency_pattern": {"q_proj": 0}}, "n_frequency_pattern"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"target_modules": ".*proj", "layers_to_transform": [0]}, "layers_to_transform"),
])
def test_bad_config_values_raise_config_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        peftkit.FourierFTConfig(**kwargs)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("kwargs", "field"), [({"n_frequency": 201}, "n_frequency"),
                                               ({"n_frequency_pattern": {"lin0": 201}}, "n_frequency_pattern")])
def test_more_frequencies_than_weight_entries_raise(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"{field}.*201.*200"):
        peftkit.get_peft_model(MLP(), peftkit.FourierFTConfig(target_modules=["lin0"], **{"n_frequency": 10, **kwargs}))


def test_conv1d_layers_get_fan_in_fan_out_without_changing_the_users_config() -> None:
    """The reference flips ``config.fan_in_fan_out`` in place (True for GPT-2 ``Conv1D``, False for ``nn.Linear``);
    peftkit records it per layer and in its stored copy (so the saved file says True, as the reference's), and
    leaves the user's config as given."""
    config = peftkit.FourierFTConfig(n_frequency=16, target_modules=["c_attn"])
    model = peftkit.get_peft_model(case_model("gpt2-causal"), config)
    assert config.fan_in_fan_out is False and model.peft_config["default"].fan_in_fan_out is True
    assert all(layer.fan_in_fan_out for layer in _layers(model))


def test_inspect_strength_is_scaled_spectrum_norm_by_parseval() -> None:
    """``peftkit inspect`` measures ``scaling · ‖spectrum‖``, which equals ``‖IFFT2(S) · scaling‖_F · sqrt(out · in)``."""
    from peftkit.methods.fourierft import FOURIERFT
    from peftkit.methods.fourierft.layers import spectral_indices

    spectrum = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows, cols = spectral_indices(6, 5, 20, 7)
    dense = torch.zeros(6, 5, dtype=torch.float64).index_put((rows, cols), spectrum)
    shape, rank, strength, _ = FOURIERFT.update_strength({"fourierft_spectrum": spectrum}, {"scaling": 3.0})
    assert shape == [20] and rank is None
    expected = float(torch.fft.ifft2(dense).abs().pow(2).sum().sqrt() * 3.0 * math.sqrt(30))
    assert strength == pytest.approx(expected, rel=1e-12)


def test_unsupported_module_raises_typed_error() -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        peftkit.get_peft_model(model, peftkit.FourierFTConfig(n_frequency=4, target_modules=["0"]))


def test_default_targets_are_the_reference_table() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING as TABLE

    for model_type, targets in TABLE.items():
        expected = targets if isinstance(targets, str) else set(targets)  # a regex str or a list of names
        assert default_fourierft_targets(model_type) == expected, model_type
