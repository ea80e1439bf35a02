"""KaSA (``LoraConfig.kasa_config``, issue 20 item 2): the base weight loses its ``r`` smallest singular components
when the adapter is created, and the update is ``scaling * B diag(lora_diag) A`` (reference: 🤗 PEFT 0.21.2
``KasaLinearVariant``). Checked against a plain implementation written here and against the reference both ways."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lora_variant_helpers import (
    WEIGHTS,
    check_merge_matches_reference,
    check_save_load_round_trip,
    check_typed_sub_config_error,
    perturb_adapter,
    randn,
    saved_config,
    two_linear,
)
from numerics import fp_tol
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError

peft = pytest.importorskip("peft")

# the SVD-truncated base and the adapter path run the same float32 math in both libraries (same torch.linalg.svd on
# the same weight); outputs differ by summation order only: reductions of at most 16 + 12 + rank terms per layer
TOL = fp_tol(torch.float32, 64)


def _model() -> nn.Module:
    """``x: (N, 16) -> (N, 8)`` through two linears (``fc1: 16 -> 12``, ``fc2: 12 -> 8``)."""
    return two_linear(16, 12, 8)


def _inputs() -> torch.Tensor:
    return randn(5, 16)


def _kw(**extra: object) -> dict[str, object]:
    return {"r": 4, "lora_alpha": 8, "target_modules": ["fc1", "fc2"], **extra}


def _perturb(model: nn.Module) -> None:
    """Move the adapter away from identity: every ``lora_A``, ``lora_B`` and ``lora_diag`` gets noise."""
    perturb_adapter(model, seed=3, scale=0.3)


def _plain_truncate(weight: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(weight.double(), full_matrices=False)
    keep = S.numel() - r
    return (U[:, :keep] @ torch.diag(S[:keep]) @ Vh[:keep]).float()


def _peftkit_model(**extra: object) -> nn.Module:
    extra.setdefault("kasa_config", {})
    return peftkit.get_peft_model(_model(), peftkit.LoraConfig(**_kw(**extra)))


def _reference_model(**extra: object) -> nn.Module:
    from peft.tuners.lora.config import KasaConfig

    return peft.get_peft_model(_model(), peft.LoraConfig(**_kw(kasa_config=KasaConfig(), **extra)))


def test_math_matches_plain_implementation() -> None:
    """The base weights are truncated at creation and the forward is ``W_trunc x + b + s * B diag(d) A x``."""
    original = _model()
    model = _peftkit_model()
    _perturb(model)
    x = _inputs()
    h = x
    for name in ("fc1", "fc2"):
        base = getattr(original, name)
        layer = getattr(model.base_model.model, name)
        w_trunc = _plain_truncate(base.weight, 4)
        torch.testing.assert_close(layer.base_layer.weight, w_trunc, **TOL)
        A, B, d = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_diag["default"]
        h = h @ w_trunc.T + base.bias + 2.0 * (h @ A.T * d) @ B.T
        h = torch.relu(h) if name == "fc1" else h
    torch.testing.assert_close(model(x), h, **TOL)


def test_zero_update_at_init() -> None:
    """B = 0: the adapted model computes the truncated base model (the adapter adds nothing)."""
    model = _peftkit_model()
    with model.disable_adapter():
        expected = model(_inputs())
    torch.testing.assert_close(model(_inputs()), expected, atol=0, rtol=0)  # B = 0 adds exact zeros, same base
    assert not torch.allclose(expected, _model()(_inputs()))  # the truncation changed the base


def test_saved_keys_shapes_and_config_match_reference(tmp_path: Path) -> None:
    ours, ref = _peftkit_model(), _reference_model()
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    a, b = load_file(tmp_path / "ours" / WEIGHTS), load_file(tmp_path / "ref" / WEIGHTS)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert "base_model.model.fc1.lora_diag" in a
    assert saved_config(tmp_path / "ours")["kasa_config"] == saved_config(tmp_path / "ref")["kasa_config"] == {
        "beta": 1e-4, "gamma": 1e-3}


@pytest.mark.parametrize("direction", ["peftkit_to_peft", "peft_to_peftkit"])
def test_interop(tmp_path: Path, direction: str) -> None:
    """An adapter saved by either library loads in the other (which truncates its fresh base the same way) with
    the same outputs."""
    source = _peftkit_model(kasa_config={"beta": 0.5, "gamma": 0.25}) if direction == "peftkit_to_peft" else \
        _reference_model()
    _perturb(source)
    source.save_pretrained(tmp_path)
    x = _inputs()
    with torch.no_grad():
        expected = source(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if direction == "peftkit_to_peft":
            loaded = peft.PeftModel.from_pretrained(_model(), tmp_path)
            assert loaded.peft_config["default"].kasa_config.beta == 0.5
        else:
            loaded = peftkit.PeftModel.from_pretrained(_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _peftkit_model()
    _perturb(model)
    for loaded in check_save_load_round_trip(model, _model, _inputs(), tmp_path):
        assert isinstance(loaded.peft_config["default"].kasa_config, peftkit.KasaConfig)


def test_lora_diag_trains() -> None:
    model = _peftkit_model()
    _perturb(model)
    model(_inputs()).sum().backward()
    layer = model.base_model.model.fc1
    assert layer.lora_diag["default"].requires_grad and layer.lora_diag["default"].grad is not None
    assert not layer.base_layer.weight.requires_grad


def test_merge_unmerge_and_merge_and_unload_match_reference(tmp_path: Path) -> None:
    model = _peftkit_model()
    _perturb(model)
    truncated = model.base_model.model.fc1.base_layer.weight.clone()

    def back_to_truncated(model: nn.Module, expected: torch.Tensor) -> None:
        torch.testing.assert_close(model.base_model.model.fc1.base_layer.weight, truncated, **TOL)

    check_merge_matches_reference(model, _model, _inputs(), tmp_path, TOL, back_to_truncated)


def test_kasa_loss_matches_reference(tmp_path: Path) -> None:
    model = _peftkit_model(kasa_config={"beta": 0.5, "gamma": 0.25})
    _perturb(model)
    model.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(_model(), tmp_path)
    ours = model.base_model._get_kasa_loss()
    # plain: beta * sum(d^2) + gamma * (||B^T B - I|| + ||A A^T - I||) summed over the layers
    plain = 0.0
    for name in ("fc1", "fc2"):
        layer = getattr(model.base_model.model, name)
        A, B, d = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_diag["default"]
        eye = torch.eye(4)
        plain = plain + 0.5 * (d ** 2).sum() + 0.25 * ((B.T @ B - eye).norm() + (A @ A.T - eye).norm())
    torch.testing.assert_close(ours, plain, **TOL)
    torch.testing.assert_close(ours, ref.base_model._get_kasa_loss(), **TOL)
    assert model.base_model._get_kasa_loss(adapter_names="other") == 0.0


def test_rejections() -> None:
    with pytest.raises(ConfigError, match="beta"):
        peftkit.LoraConfig(**_kw(kasa_config={"beta": -1.0}))
    with pytest.raises(ConfigError, match="unknown keys"):
        peftkit.LoraConfig(**_kw(kasa_config={"betta": 1.0}))
    with pytest.raises(ConfigError, match="r < min"):
        peftkit.get_peft_model(_model(), peftkit.LoraConfig(**_kw(r=8, kasa_config={})))
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    with pytest.raises(ConfigError, match="nn.Linear layers only"):
        peftkit.get_peft_model(emb, peftkit.LoraConfig(r=2, target_modules=["0"], kasa_config={}))


def test_gpt2_conv1d_rejected() -> None:
    from models import tiny_gpt2

    with pytest.raises(ConfigError, match="fan_in_fan_out"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftkit.get_peft_model(tiny_gpt2(), peftkit.LoraConfig(r=2, target_modules=["c_attn"], kasa_config={}))


def test_mixing_with_plain_lora_rejected() -> None:
    model = _peftkit_model()
    with pytest.raises(ValueError, match="KaSA cannot be combined"):
        model.add_adapter("plain", peftkit.LoraConfig(**_kw()))
    plain = peftkit.get_peft_model(_model(), peftkit.LoraConfig(**_kw()))
    weight = plain.base_model.model.fc1.base_layer.weight.clone()
    with pytest.raises(ValueError, match="KaSA cannot be combined"):
        plain.add_adapter("kasa", peftkit.LoraConfig(**_kw(kasa_config={})))
    assert torch.equal(plain.base_model.model.fc1.base_layer.weight, weight)  # refused before any truncation


def test_meta_base_weight_refused() -> None:
    """The truncation needs the base weights' values: a model on the meta device is refused, never left untruncated."""
    with torch.device("meta"):
        model = two_linear(16, 12, 8)
    with pytest.raises(ConfigError, match="materialised"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(**_kw(kasa_config={})))


def _plain_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    """``scaling * B diag(d) A``: ``(out, in)``, written out."""
    A, B, d = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.lora_diag[adapter]
    return layer.scaling[adapter] * (B @ torch.diag(d) @ A)


def test_get_delta_weight_includes_lora_diag() -> None:
    """``get_delta_weight`` (what add_weighted_adapter, check_merge and conversions read) is KaSA's full update."""
    model = _peftkit_model()
    _perturb(model)
    for name in ("fc1", "fc2"):
        layer = getattr(model.base_model.model, name)
        torch.testing.assert_close(layer.get_delta_weight("default"), _plain_delta(layer, "default"), **TOL)


def test_safe_merge_sees_lora_diag_before_writing() -> None:
    """A NaN in one layer's ``lora_diag`` (factors finite) is caught by safe_merge before any layer is written."""
    model = _peftkit_model()
    _perturb(model)
    with torch.no_grad():
        model.base_model.model.fc2.lora_diag["default"][0] = float("nan")
    before = {n: getattr(model.base_model.model, n).base_layer.weight.clone() for n in ("fc1", "fc2")}
    with pytest.raises(peftkit.errors.MergeError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    for name, weight in before.items():
        layer = getattr(model.base_model.model, name)
        assert torch.equal(layer.base_layer.weight, weight) and not layer.merged_adapters  # nothing was written


def _two_kasa_adapters() -> nn.Module:
    """``default`` and ``other``, both KaSA at r = 4 (the second truncation drops the zeros the first left)."""
    model = _peftkit_model()
    model.add_adapter("other", peftkit.LoraConfig(**_kw(kasa_config={})))
    _perturb(model)
    return model


@pytest.mark.parametrize("combination_type", ["linear", "svd"])
def test_add_weighted_adapter_combines_full_kasa_updates(combination_type: str) -> None:
    """The combined adapter's update is the weighted sum of the sources' ``s B diag(d) A`` (its own ``lora_diag``
    is 1), and the base is not truncated further. (The reference combines ``s B A`` and gives the new adapter a
    random ``lora_diag``: README, deliberate differences.)"""
    model = _two_kasa_adapters()
    layers = [getattr(model.base_model.model, n) for n in ("fc1", "fc2")]
    bases = [layer.base_layer.weight.clone() for layer in layers]
    if combination_type == "linear":  # one source: exact, 0.5 * ΔW
        model.add_weighted_adapter(["default"], [0.5], "mix", combination_type="linear")
        expected = [0.5 * _plain_delta(layer, "default") for layer in layers]
    else:  # svd at the sources' rank: the best rank-4 approximation of the weighted sum
        model.add_weighted_adapter(["default", "other"], [0.7, -0.4], "mix", combination_type="svd")
        expected = []
        for layer in layers:
            total = 0.7 * _plain_delta(layer, "default") - 0.4 * _plain_delta(layer, "other")
            U, S, Vh = torch.linalg.svd(total.double(), full_matrices=False)
            expected.append((U[:, :4] * S[:4] @ Vh[:4]).float())
    for layer, base, delta in zip(layers, bases, expected):
        assert torch.equal(layer.lora_diag["mix"], torch.ones(4))
        torch.testing.assert_close(layer.get_delta_weight("mix"), delta, **TOL)
        torch.testing.assert_close(layer.base_layer.weight, base, **TOL)  # no further truncation
    x = _inputs()
    model.set_adapter("mix")
    with torch.no_grad():
        h = torch.relu(x @ (bases[0] + expected[0]).T + layers[0].base_layer.bias)
        torch.testing.assert_close(model(x), h @ (bases[1] + expected[1]).T + layers[1].base_layer.bias, **TOL)


def test_combined_adapter_loads_in_reference(tmp_path: Path) -> None:
    """The combined adapter (``lora_diag = 1``, rank 4) saved alone loads in the reference on a fresh base, which it
    truncates by the same rank: the same outputs."""
    model = _two_kasa_adapters()
    model.add_weighted_adapter(["default", "other"], [0.7, -0.4], "mix", combination_type="svd")
    model.set_adapter("mix")
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    x = _inputs()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_model(), tmp_path / "mix")
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_add_weighted_adapter_refuses_a_deeper_truncation() -> None:
    """A combined rank above the sources' (``cat``: 4 + 4) would truncate the base again: refused, model unchanged."""
    model = _two_kasa_adapters()
    weight = model.base_model.model.fc1.base_layer.weight.clone()
    with pytest.raises(ConfigError, match="truncate the base weights"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="cat")
    assert "mix" not in model.peft_config
    assert torch.equal(model.base_model.model.fc1.base_layer.weight, weight)


@pytest.mark.parametrize("direction", ["peftkit_to_peft", "peft_to_peftkit"])
def test_kasa_config_class_round_trips_with_reference(tmp_path: Path, direction: str) -> None:
    """``peftkit.KasaConfig`` is accepted where the dict is, saved as the reference saves its ``KasaConfig``, and a
    config saved by either library loads in the other as that library's class with the same values."""
    ours = peftkit.LoraConfig(**_kw(kasa_config=peftkit.KasaConfig(beta=0.5, gamma=0.25)))
    assert ours.kasa_config == peftkit.KasaConfig(0.5, 0.25) == peftkit.LoraConfig(**_kw(
        kasa_config={"beta": 0.5, "gamma": 0.25})).kasa_config
    if direction == "peftkit_to_peft":
        peftkit.get_peft_model(_model(), ours).save_pretrained(tmp_path)
        loaded = peft.LoraConfig.from_pretrained(tmp_path).kasa_config
        assert loaded == peft.KasaConfig(beta=0.5, gamma=0.25)
    else:
        peft.get_peft_model(_model(), peft.LoraConfig(**_kw(kasa_config=peft.KasaConfig(beta=0.5, gamma=0.25)))
                            ).save_pretrained(tmp_path)
        loaded = peftkit.LoraConfig.from_pretrained(tmp_path).kasa_config
        assert type(loaded) is peftkit.KasaConfig and loaded == peftkit.KasaConfig(0.5, 0.25)
    assert saved_config(tmp_path)["kasa_config"] == {"beta": 0.5, "gamma": 0.25}


@pytest.mark.parametrize(("kwargs", "error", "builtin"), [
    ({"beta": -1.0}, ConfigError, ValueError),  # the reference: ValueError
    ({"gamma": -0.5}, ConfigError, ValueError),
    ({"beta": "0.1"}, peftkit.errors.ConfigTypeError, TypeError),  # the reference: TypeError from `"0.1" < 0`
    ({"gamma": None}, peftkit.errors.ConfigTypeError, TypeError),
])
def test_kasa_config_validation_is_typed(kwargs: dict[str, object], error: type, builtin: type) -> None:
    check_typed_sub_config_error(peftkit.KasaConfig, peft.KasaConfig, "kasa_config", kwargs, error, builtin)
