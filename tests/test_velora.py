"""VeLoRA (``LoraConfig.velora_config``, issue 20 item 2): plain LoRA forward, but ``lora_A``'s weight gradient is
computed from the input compressed to one coordinate per sub-token (reference: 🤗 PEFT 0.21.2
``VeloraLinearVariant``, ``peft/tuners/lora/velora.py``). Checked against a plain implementation written here and
against the reference both ways, gradients included."""

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

# same float32 math in both libraries, different summation order: reductions of at most 10 + 6 features, the rank
# and the 5 * 3 tokens summed in a weight gradient
TOL = fp_tol(torch.float32, 64)


def _model() -> nn.Module:
    """``x: (N, T, 10) -> (N, T, 4)``; 10 input features in 3 groups of 4 (2 padded), 6 in 4 groups of 2."""
    return two_linear(10, 6, 4)


def _inputs() -> torch.Tensor:
    return randn(5, 3, 10)


def _sub(**kw: object) -> dict[str, object]:
    return {"num_groups": 3, "scale": 1.5, "init_type": "batch_average", **kw}


def _kw(**extra: object) -> dict[str, object]:
    return {"r": 2, "lora_alpha": 4, "target_modules": ["fc1", "fc2"], **extra}


def _perturb(model: nn.Module) -> None:
    perturb_adapter(model, seed=3, scale=0.3)


def _peftkit_model(**sub: object) -> nn.Module:
    return peftkit.get_peft_model(_model(), peftkit.LoraConfig(**_kw(velora_config=_sub(**sub))))


def _reference_model(**sub: object) -> nn.Module:
    from peft.tuners.lora.config import VeloraConfig

    return peft.get_peft_model(_model(), peft.LoraConfig(**_kw(velora_config=VeloraConfig(**_sub(**sub)))))


def _plain_reconstruction(x: torch.Tensor, groups: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂, v)`` for ``x: (T, in)``: v = unit mean sub-token, x̂ = scale * per-group projection of x on v."""
    T, n = x.shape
    D = -(-n // groups)
    padded = torch.cat([x, x.new_zeros(T, groups * D - n)], dim=1)
    subs = padded.reshape(T, groups, D)
    v = subs.reshape(-1, D).mean(0)
    v = v / v.norm()
    coords = subs @ v  # (T, G)
    x_hat = (coords.unsqueeze(-1) * v).reshape(T, groups * D)[:, :n] * scale
    return x_hat, v


def test_gradients_match_plain_implementation() -> None:
    """Forward = plain LoRA; dA = gᵀ x̂ from the compressed input; dB and the input gradient are exact."""
    model = peftkit.get_peft_model(nn.Sequential(nn.Linear(10, 6)), peftkit.LoraConfig(
        r=2, lora_alpha=4, target_modules=["0"], velora_config=_sub()))
    _perturb(model)
    model.train()
    layer = model.base_model.model[0]
    W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = _inputs().reshape(15, 10).requires_grad_(True)
    w = torch.randn(15, 6, generator=torch.Generator().manual_seed(5))
    out = model(x)
    torch.testing.assert_close(out, x @ W.T + b + 2.0 * (x @ A.T) @ B.T, **TOL)
    (out * w).sum().backward()
    x_hat, v = _plain_reconstruction(x.detach(), 3, 1.5)
    g_h = 2.0 * w @ B.detach()  # (T, r)
    torch.testing.assert_close(layer.lora_velora_embed["default"], v, **TOL)
    torch.testing.assert_close(A.grad, g_h.T @ x_hat, **TOL)
    torch.testing.assert_close(B.grad, 2.0 * w.T @ (x.detach() @ A.detach().T), **TOL)
    torch.testing.assert_close(x.grad, w @ W + g_h @ A.detach(), **TOL)
    assert not torch.allclose(A.grad, g_h.T @ x.detach())  # the compression is really used


def test_eval_and_no_grad_are_plain_lora() -> None:
    model = _peftkit_model()
    _perturb(model)
    x = _inputs()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    torch.testing.assert_close(model(x), expected, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)


def test_identity_at_init() -> None:
    model = _peftkit_model()
    torch.testing.assert_close(model(_inputs()), _model()(_inputs()), atol=0, rtol=0)  # B = 0: same base kernels


def test_saved_keys_shapes_and_config_match_reference(tmp_path: Path) -> None:
    _peftkit_model().save_pretrained(tmp_path / "ours")
    _reference_model().save_pretrained(tmp_path / "ref")
    a, b = load_file(tmp_path / "ours" / WEIGHTS), load_file(tmp_path / "ref" / WEIGHTS)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert a["base_model.model.fc1.lora_velora_embed"].shape == (4,)
    assert saved_config(tmp_path / "ours")["velora_config"] == saved_config(tmp_path / "ref")["velora_config"] == _sub()


@pytest.mark.parametrize("init_type", ["batch_average", "batch_average_once", "random"])
@pytest.mark.parametrize("direction", ["peftkit_to_peft", "peft_to_peftkit"])
def test_interop_outputs_and_gradients(tmp_path: Path, direction: str, init_type: str) -> None:
    """Saved by either library, loaded trainable by the other: same eval outputs, same embed, and the same
    gradients (the compressed backward included) over two training steps."""
    source = _peftkit_model(init_type=init_type) if direction == "peftkit_to_peft" else \
        _reference_model(init_type=init_type)
    _perturb(source)
    source.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = peft.PeftModel if direction == "peftkit_to_peft" else peftkit.PeftModel
        loaded = other.from_pretrained(_model(), tmp_path, is_trainable=True)
    x = _inputs()
    source.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), atol=1e-5, rtol=1e-5)
    source.train()
    loaded.train()
    for step in range(2):
        xs = x * (step + 1)
        for m in (source, loaded):
            m.zero_grad()
            m(xs).pow(2).sum().backward()
        grads = {n: p.grad for n, p in source.named_parameters() if p.requires_grad}
        assert grads and {n for n, p in loaded.named_parameters() if p.requires_grad} == set(grads)
        for n, p in loaded.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-5)
        for name in ("fc1", "fc2"):
            torch.testing.assert_close(getattr(loaded.base_model.model, name).lora_velora_embed["default"],
                                       getattr(source.base_model.model, name).lora_velora_embed["default"],
                                       **TOL)


def test_batch_average_once_keeps_first_projection() -> None:
    model = _peftkit_model(init_type="batch_average_once")
    model.train()
    model(_inputs()).sum().backward()
    first = model.base_model.model.fc1.lora_velora_embed["default"].clone()
    model(_inputs() * 3 + 1).sum().backward()
    torch.testing.assert_close(model.base_model.model.fc1.lora_velora_embed["default"], first,
                               atol=0, rtol=0)  # an untouched buffer


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _peftkit_model(init_type="random")
    _perturb(model)
    for loaded in check_save_load_round_trip(model, _model, _inputs(), tmp_path):
        assert torch.equal(loaded.base_model.model.fc1.lora_velora_embed["default"],
                           model.base_model.model.fc1.lora_velora_embed["default"])
        assert isinstance(loaded.peft_config["default"].velora_config, peftkit.VeloraConfig)


def test_merge_and_unload_matches_reference(tmp_path: Path) -> None:
    model = _peftkit_model()
    _perturb(model)

    def same_outputs(model: nn.Module, expected: torch.Tensor) -> None:
        torch.testing.assert_close(model(_inputs()), expected, **TOL)

    check_merge_matches_reference(model, _model, _inputs(), tmp_path, TOL, same_outputs)


def test_delete_adapter_removes_embed() -> None:
    model = _peftkit_model()
    model.add_adapter("other", peftkit.LoraConfig(**_kw(velora_config=_sub())))
    model.delete_adapter("other")
    assert "other" not in model.base_model.model.fc1.lora_velora_embed


def test_rejections() -> None:
    for bad in ({"num_groups": 0}, {"scale": 0.0}, {"init_type": "mean"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            peftkit.LoraConfig(**_kw(velora_config=_sub(**bad)))
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    with pytest.raises(ConfigError, match="nn.Linear layers only"):
        peftkit.get_peft_model(emb, peftkit.LoraConfig(r=2, target_modules=["0"], velora_config={}))
    conv = nn.Sequential(nn.Conv1d(4, 4, 1))
    with pytest.raises(ConfigError, match="nn.Linear layers only"):
        peftkit.get_peft_model(conv, peftkit.LoraConfig(r=2, target_modules=["0"], velora_config={}))


def test_backward_record_is_compressed() -> None:
    """What ``lora_A``'s node keeps for backward is ``(T, G)`` coordinates (plus the weight and the projection),
    never the ``(T, in)`` input."""
    from peftkit.methods.lora.velora import VeloraLinearFn

    x = torch.randn(64, 10, requires_grad=True)
    weight = torch.randn(2, 10, requires_grad=True)
    embed = torch.nn.functional.normalize(torch.randn(4), dim=0)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        VeloraLinearFn.apply(x, weight, embed, 3, 1.0).sum().backward()
    assert sorted(saved) == sorted([(64, 3), (2, 10), (4,)])


@pytest.mark.parametrize("direction", ["peftkit_to_peft", "peft_to_peftkit"])
def test_velora_config_class_round_trips_with_reference(tmp_path: Path, direction: str) -> None:
    """``peftkit.VeloraConfig`` is accepted where the dict is, saved as the reference saves its ``VeloraConfig``, and
    a config saved by either library loads in the other as that library's class with the same values."""
    ours = peftkit.LoraConfig(**_kw(velora_config=peftkit.VeloraConfig(**_sub())))
    assert ours.velora_config == peftkit.VeloraConfig(3, 1.5, "batch_average") == peftkit.LoraConfig(
        **_kw(velora_config=_sub())).velora_config
    if direction == "peftkit_to_peft":
        peftkit.get_peft_model(_model(), ours).save_pretrained(tmp_path)
        loaded = peft.LoraConfig.from_pretrained(tmp_path).velora_config
        assert loaded == peft.VeloraConfig(**_sub())
    else:
        peft.get_peft_model(_model(), peft.LoraConfig(**_kw(velora_config=peft.VeloraConfig(**_sub())))
                            ).save_pretrained(tmp_path)
        loaded = peftkit.LoraConfig.from_pretrained(tmp_path).velora_config
        assert type(loaded) is peftkit.VeloraConfig and loaded == peftkit.VeloraConfig(**_sub())
    assert saved_config(tmp_path)["velora_config"] == _sub()


@pytest.mark.parametrize(("kwargs", "error", "builtin"), [
    ({"num_groups": 0}, ConfigError, ValueError),  # the reference: ValueError
    ({"scale": -1.0}, ConfigError, ValueError),
    ({"init_type": "mean"}, ConfigError, ValueError),
    ({"num_groups": "4"}, peftkit.errors.ConfigTypeError, TypeError),  # the reference: TypeError from `"4" <= 0`
    ({"scale": None}, peftkit.errors.ConfigTypeError, TypeError),
])
def test_velora_config_validation_is_typed(kwargs: dict[str, object], error: type, builtin: type) -> None:
    check_typed_sub_config_error(peftkit.VeloraConfig, peft.VeloraConfig, "velora_config", kwargs, error, builtin)
