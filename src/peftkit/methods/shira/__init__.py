"""SHiRA (sparse high-rank adapters): registration of the method with the registry."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError, PeftWarning
from ...injection.apply import skip_random_init
from ...layers.dispatch import LINEAR, QUANT_LINEAR, module_kind, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import ShiraConfig, random_mask
from .layers import ShiraLayer, mask_indices, random_indices

#: the module kinds SHiRA wraps (the reference: ``nn.Linear``, plain or quantized)
SHIRA_KINDS = (LINEAR, QUANT_LINEAR)


def default_shira_targets(model_type: str | None) -> set[str] | str | None:
    """The reference's ``TRANSFORMERS_MODELS_TO_SHIRA_TARGET_MODULES_MAPPING``: LoRA's table, Phi on q/v only."""
    if model_type == "phi":
        return {"q_proj", "v_proj"}
    return default_lora_targets(model_type)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the kind (``nn.Linear``, plain or quantized) and ``r``, checked against the layer's size."""
    assert isinstance(config, ShiraConfig)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    require_kind(name, module, SHIRA_KINDS, "SHiRA")
    size, count = base.in_features * base.out_features, config.r * (base.in_features + base.out_features)
    if count > size:
        raise ConfigError("r", config.r, f"r * (in + out) = {count} entries exceed the {size} weights of target "
                                         f"module {name!r}; use r <= {size // (base.in_features + base.out_features)}")
    return {"kind": module_kind(module), "r": config.r}


def _mask_kwargs(mask_fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``kwargs`` that ``mask_fn`` accepts (all of them when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(mask_fn).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def layer_indices(config: ShiraConfig, base: nn.Linear, r: int) -> torch.Tensor | None:
    """``(2, k)`` int32 positions of a new adapter on ``base``: the random mask's (drawn without forming the mask),
    a custom ``config.mask_fn``'s, or None while loading without a mask function (the file holds them)."""
    shape = (base.out_features, base.in_features)
    if config.mask_fn is random_mask:
        return random_indices(*shape, r, config.random_seed, base.weight.device)
    if config.mask_fn is None:
        if skip_random_init():
            return None
        raise ConfigError("mask_type", config.mask_type,
                          "'random', or set config.mask_fn = <a function (base_layer, r, **kwargs) -> 0/1 mask>")
    kwargs = {"bias": base.bias is not None, "random_seed": config.random_seed}
    mask = config.mask_fn(base, r, **_mask_kwargs(config.mask_fn, kwargs))
    return mask_indices(mask, shape, r * sum(shape))


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> ShiraLayer:
    assert isinstance(config, ShiraConfig)
    layer = module if isinstance(module, ShiraLayer) else ShiraLayer(module)
    indices = layer_indices(config, layer.get_base_layer(), options["r"])
    layer.update_layer(adapter_name, options["r"], indices, config.init_weights, dtype=dtype)
    return layer


def _prepare_load(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Before a load writes ``shira_indices``: every layer gets its own copy (they may share the random mask's)."""
    for module in model.modules():
        if isinstance(module, ShiraLayer):
            module.unshare_indices(adapter_name)


def _check_config(config: PeftConfig, model: nn.Module) -> None:
    """``fan_in_fan_out=True`` is meaningless for ``nn.Linear`` (the only kind SHiRA adapts): warn, as the reference,
    and use False (without changing the config)."""
    assert isinstance(config, ShiraConfig)
    if config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to True but SHiRA adapts torch.nn.Linear only; using False",
                      PeftWarning, stacklevel=4)


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([k], None, ‖ΔW‖_F, None)`` (the entries are ``ΔW``'s only non-zeros)."""
    return [params["shira_weight"].numel()], None, float(params["shira_weight"].double().norm()), None


SHIRA = register_method(
    MethodSpec(
        peft_type=PeftType.SHIRA,
        prefix="shira_",
        config_cls=ShiraConfig,
        tuner_name="ShiraModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_shira_targets,
        check_config=_check_config,
        identity_at_init=True,
        mergeable=True,
        # tiny models: r=1 keeps r * (in + out) <= in * out on their smallest layers
        example_configs=({"r": 1}, {"r": 1, "random_seed": 7}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=SHIRA_KINDS,
        mixed_compatible=True,  # the reference registers SHiRA with is_mixed_compatible=True
        layer_cls=ShiraLayer,
        update_strength=_update_strength,
        prepare_load=_prepare_load,
    )
)

__all__ = ["SHIRA", "ShiraConfig", "ShiraLayer", "default_shira_targets", "random_mask"]
