"""KaSA (``LoraConfig.kasa_config``, issue 20 item 2): the base weight loses its ``r`` smallest singular components
when the adapter is created, and the update is ``scaling * B diag(lora_diag) A`` (reference: 🤗 PEFT 0.21.2
``KasaLinearVariant``). Checked against a plain implementation written here and against the reference both ways."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from numerics import fp_tol
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.errors import ConfigError

peft = pytest.importorskip("peft")

WEIGHTS = "adapter_model.safetensors"
# the SVD-truncated base and the adapter path run the same float32 math in both libraries (same torch.linalg.svd on
# the same weight); outputs differ by summation order only: reductions of at most 16 + 12 + rank terms per layer
TOL = fp_tol(torch.float32, 64)


class MLP(nn.Module):
    """``x: (N, 16) -> (N, 8)`` through two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _model() -> MLP:
    torch.manual_seed(0)
    return MLP()


def _inputs() -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(1))


def _kw(**extra: object) -> dict[str, object]:
    return {"r": 4, "lora_alpha": 8, "target_modules": ["fc1", "fc2"], **extra}


def _perturb(model: nn.Module) -> None:
    """Move the adapter away from identity: every ``lora_B`` and ``lora_diag`` gets noise."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_diag" in name or "lora_A" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)


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
    torch.testing.assert_close(model(_inputs()), expected, atol=0, rtol=0)
    assert not torch.allclose(expected, _model()(_inputs()))  # the truncation changed the base


def test_saved_keys_shapes_and_config_match_reference(tmp_path: Path) -> None:
    ours, ref = _peftkit_model(), _reference_model()
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    a, b = load_file(tmp_path / "ours" / WEIGHTS), load_file(tmp_path / "ref" / WEIGHTS)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert "base_model.model.fc1.lora_diag" in a
    cfg_a = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cfg_b = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    assert cfg_a["kasa_config"] == cfg_b["kasa_config"] == {"beta": 1e-4, "gamma": 1e-3}


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
    model.save_pretrained(tmp_path)
    x = _inputs()
    with torch.no_grad():
        expected = model(x)
    for trainable, low_mem in ((False, False), (True, False), (False, True)):
        loaded = peftkit.PeftModel.from_pretrained(_model(), tmp_path, is_trainable=trainable,
                                                   low_cpu_mem_usage=low_mem)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
        assert isinstance(loaded.peft_config["default"].kasa_config, peftkit.methods.lora.kasa.KasaConfig)


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
    x = _inputs()
    with torch.no_grad():
        expected = model(x)
        truncated = model.base_model.model.fc1.base_layer.weight.clone()
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, **TOL)
        model.unmerge_adapter()
        torch.testing.assert_close(model.base_model.model.fc1.base_layer.weight, truncated, **TOL)
        model.save_pretrained(tmp_path)
        ours = model.merge_and_unload(safe_merge=True)(x)
        ref = peft.PeftModel.from_pretrained(_model(), tmp_path).merge_and_unload()(x)
    torch.testing.assert_close(ours, expected, **TOL)
    torch.testing.assert_close(ours, ref, **TOL)


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
        model = MLP()
    with pytest.raises(ConfigError, match="materialised"):
        peftkit.get_peft_model(model, peftkit.LoraConfig(**_kw(kasa_config={})))
