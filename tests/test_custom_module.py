"""Custom LoRA layers for a user's module type: ``LoraConfig._register_custom_module`` (issue 18, item 4).

As the reference (🤗 PEFT 0.21.2, ``LoraConfig._register_custom_module`` and ``LoraModel._create_new_module``): the
user maps a module type to their own LoRA layer class; a targeted module of that type (checked on the base layer,
before every built-in layer kind, so ``nn.Linear`` can be overridden too) is wrapped by the user's class; the mapping
lives on the config object only and is never written to ``adapter_config.json``.

The custom classes are written as the reference's tests and docs write them (``class MyLora(lora.Linear): pass``),
with peftkit's import in place of ``peft.tuners.lora``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from numerics import fp_tol
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.methods.lora import layers as lora

peft = pytest.importorskip("peft")


class LinearLike(nn.Module):
    """Behaves like ``nn.Linear`` but is not one, so LoRA cannot target it without a custom layer.
    ``x: (..., in) -> (..., out)``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MyModel(nn.Module):
    """``lin0: Linear(10, 10) -> relu -> my_module: LinearLike(10, 10) -> lin1: Linear(10, 2)``; ``x: (N, 10)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 10)
        self.relu = nn.ReLU()
        self.my_module = LinearLike(10, 10)
        self.lin1 = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.my_module(self.relu(self.lin0(x))))


class MyLora(lora.Linear):
    """The custom LoRA layer, as the reference's docs write it (re-using the plain LoRA linear code)."""


class MyLinearLora(lora.Linear):
    """A custom layer registered for ``nn.Linear`` itself (overrides the built-in dispatch)."""


#: reduction length of one forward: three 10-wide matmuls plus rank-8 updates
_TOL = fp_tol(torch.float32, 3 * (10 + 8))


def _config(**kwargs: object) -> peftkit.LoraConfig:
    config = peftkit.LoraConfig(target_modules=["lin0", "my_module", "lin1"], **kwargs)
    config._register_custom_module({LinearLike: MyLora})
    return config


def test_unregistered_custom_module_is_refused() -> None:
    """Without the mapping, a ``LinearLike`` target raises (it has no built-in LoRA layer)."""
    config = peftkit.LoraConfig(target_modules=["my_module"])
    with pytest.raises(peftkit.UnsupportedModuleError, match="my_module"):
        peftkit.get_peft_model(MyModel(), config)


def test_register_custom_module_updates_the_mapping() -> None:
    """``_custom_modules`` starts as None and accumulates mappings (``dict.update``), as the reference."""
    config = peftkit.LoraConfig()
    assert config._custom_modules is None
    config._register_custom_module({LinearLike: MyLora})
    config._register_custom_module({nn.Linear: MyLinearLora})
    assert config._custom_modules == {LinearLike: MyLora, nn.Linear: MyLinearLora}


def test_custom_lora_layer_used() -> None:
    """The registered class wraps the custom module; the other targets keep the built-in layer."""
    model = peftkit.get_peft_model(MyModel(), _config())
    inner = model.base_model.model
    assert type(inner.my_module) is MyLora
    assert isinstance(inner.my_module.base_layer, LinearLike)
    assert type(inner.lin0) is lora.Linear and type(inner.lin1) is lora.Linear
    # the stored config keeps the mapping (the tuner stores a copy of the user's config)
    assert model.peft_config["default"]._custom_modules == {LinearLike: MyLora}


def test_custom_module_overrides_builtin_dispatch() -> None:
    """A mapping for ``nn.Linear`` is checked before the built-in kinds, as the reference's dispatch order."""
    config = peftkit.LoraConfig(target_modules=["lin0", "lin1"])
    config._register_custom_module({nn.Linear: MyLinearLora})
    model = peftkit.get_peft_model(MyModel(), config)
    assert type(model.base_model.model.lin0) is MyLinearLora
    assert type(model.base_model.model.lin1) is MyLinearLora


def test_custom_layer_trains_and_merges() -> None:
    """Only the adapter trains; the custom layer's weights move; merge keeps the output; unload gives back the
    user's module."""
    torch.manual_seed(0)
    model = peftkit.get_peft_model(MyModel(), _config())
    layer = model.base_model.model.my_module
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 10)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "base_model.model.my_module.lora_B.default.weight" in changed
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in changed)
    model.eval()
    with torch.no_grad():
        out = model(x)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), out, **_TOL)  # merged W + ΔW vs. W x + B A x: another sum order
    assert type(merged.my_module) is LinearLike
    assert layer.merged_adapters == ["default"]


def test_second_adapter_and_delete() -> None:
    """A second adapter is added to the existing custom layer (no re-wrapping); deleting it keeps the layer."""
    model = peftkit.get_peft_model(MyModel(), _config())
    layer = model.base_model.model.my_module
    model.add_adapter("other", _config(r=4))
    assert model.base_model.model.my_module is layer
    assert set(layer.lora_A) == {"default", "other"} and layer.r["other"] == 4
    model.delete_adapter("other")
    assert set(layer.lora_A) == {"default"}


def test_save_keys_and_config_not_serialised(tmp_path) -> None:
    """The checkpoint has the reference's keys for the custom layer; the mapping is not in ``adapter_config.json``
    and a loaded config has ``_custom_modules`` None (as the reference)."""
    model = peftkit.get_peft_model(MyModel(), _config())
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.my_module.lora_A.weight", "base_model.model.my_module.lora_B.weight"} <= keys
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not any("custom" in k for k in data)
    assert peftkit.LoraConfig.from_pretrained(tmp_path)._custom_modules is None


def test_load_needs_the_mapping_again(tmp_path) -> None:
    """Loading with a config carrying the mapping (``from_pretrained(..., config=...)``) restores the adapter;
    without it the custom module cannot be targeted."""
    torch.manual_seed(0)
    base = MyModel()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftkit.get_peft_model(base, _config(init_lora_weights=False))
    model.eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    fresh = MyModel()
    fresh.load_state_dict(state)
    with pytest.raises(peftkit.UnsupportedModuleError):
        peftkit.PeftModel.from_pretrained(MyModel(), tmp_path)
    config = peftkit.LoraConfig.from_pretrained(tmp_path)
    config._register_custom_module({LinearLike: MyLora})
    loaded = peftkit.PeftModel.from_pretrained(fresh, tmp_path, config=config)
    assert type(loaded.base_model.model.my_module) is MyLora
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)  # same tensors, same kernels


def _reference_custom_cls() -> type:
    from peft.tuners import lora as ref_lora

    class RefMyLora(ref_lora.Linear):
        pass

    return RefMyLora


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_interop_peftkit_to_reference(tmp_path) -> None:
    """An adapter saved by peftkit with a custom layer loads in the reference (with its own custom layer registered)
    and gives the same outputs."""
    torch.manual_seed(0)
    base = MyModel()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftkit.get_peft_model(base, _config(init_lora_weights=False))
    model.eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    ref_base = MyModel()
    ref_base.load_state_dict(state)
    ref_config = peft.LoraConfig.from_pretrained(tmp_path)
    ref_config._register_custom_module({LinearLike: _reference_custom_cls()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(ref_base, tmp_path, config=ref_config)
    ref.eval()
    assert type(ref.base_model.model.my_module).__name__ == "RefMyLora"
    with torch.no_grad():
        torch.testing.assert_close(ref(x), expected, **_TOL)  # another library: same math, other kernels


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_interop_reference_to_peftkit(tmp_path) -> None:
    """The reverse direction: the reference's custom-layer adapter loads in peftkit with the same outputs."""
    torch.manual_seed(1)
    base = MyModel()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    ref_config = peft.LoraConfig(target_modules=["lin0", "my_module", "lin1"], init_lora_weights=False)
    ref_config._register_custom_module({LinearLike: _reference_custom_cls()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(base, ref_config)
    ref.eval()
    x = torch.randn(4, 10)
    with torch.no_grad():
        expected = ref(x)
    ref.save_pretrained(tmp_path)
    fresh = MyModel()
    fresh.load_state_dict(state)
    config = peftkit.LoraConfig.from_pretrained(tmp_path)
    config._register_custom_module({LinearLike: MyLora})
    loaded = peftkit.PeftModel.from_pretrained(fresh, tmp_path, config=config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, **_TOL)  # another library: same math, other kernels


def test_factory_with_reference_calling_convention() -> None:
    """A mapping value that is not a peftkit ``LoraLayer`` subclass (a factory, as users pass ``functools.partial``
    of their class to the reference) is called the reference's way, ``cls(target, adapter_name, config=config,
    r=..., lora_alpha=..., ...)``, and must return a peftkit LoRA layer holding the adapter."""
    calls: list[dict[str, object]] = []

    def factory(target: nn.Module, adapter_name: str, config: peftkit.LoraConfig, **kwargs: object) -> lora.Linear:
        calls.append({"adapter_name": adapter_name, **kwargs})
        layer = MyLora(target)
        layer.update_layer(adapter_name, r=kwargs["r"], lora_alpha=kwargs["lora_alpha"])
        return layer

    config = peftkit.LoraConfig(target_modules=["my_module"], r=4, lora_alpha=16)
    config._register_custom_module({LinearLike: factory})
    model = peftkit.get_peft_model(MyModel(), config)
    assert type(model.base_model.model.my_module) is MyLora
    assert calls and calls[0]["adapter_name"] == "default" and calls[0]["r"] == 4 and calls[0]["lora_alpha"] == 16
    assert calls[0]["target_name"] == "my_module"


def test_factory_returning_wrong_type_is_refused() -> None:
    """A factory whose result is not a peftkit LoRA layer holding the adapter raises a TypeError naming it."""
    config = peftkit.LoraConfig(target_modules=["my_module"])
    config._register_custom_module({LinearLike: lambda target, adapter_name, **kw: nn.Identity()})
    with pytest.raises(TypeError, match="my_module"):
        peftkit.get_peft_model(MyModel(), config)
