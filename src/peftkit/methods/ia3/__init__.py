"""(IA)³: registration of the method with the registry."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import UnsupportedModuleError
from ...layers.dispatch import CONV, HF_CONV1D, LINEAR, QUANT_LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_ia3_feedforward, default_ia3_targets
from ...types import PeftType
from .combine import add_weighted_adapter
from .config import IA3Config
from .layers import IA3Layer


def _is_feedforward(name: str, feedforward: set[str] | str | None) -> bool:
    """The reference's rule: a regex must fully match the module name; a list entry must end it."""
    if feedforward is None:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(key) for key in feedforward)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the layer kind, whether it is a feedforward module, and ``fan_in_fan_out`` (detected)."""
    assert isinstance(config, IA3Config)
    kind = require_kind(name, module, (LINEAR, QUANT_LINEAR, HF_CONV1D, CONV), "IA3")
    return {"kind": kind, "is_feedforward": _is_feedforward(name, config.feedforward_modules),
            "fan_in_fan_out": kind == HF_CONV1D}


def _create_layer(
    module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str, dtype: torch.dtype
) -> IA3Layer:
    assert isinstance(config, IA3Config)
    if isinstance(module, IA3Layer):
        if module.is_feedforward != options["is_feedforward"]:
            raise UnsupportedModuleError(
                f"this IA3 layer is {'' if module.is_feedforward else 'not '}a feedforward module for its existing "
                "adapters; all adapters of one layer must agree on feedforward_modules"
            )
        layer = module
    else:
        layer = IA3Layer(module, options["kind"], options["is_feedforward"], options["fan_in_fan_out"])
    layer.update_layer(adapter_name, init_ia3_weights=config.init_ia3_weights, dtype=dtype)
    return layer


def _resolve_config(config: PeftConfig, model: nn.Module) -> dict[str, Any]:
    """``feedforward_modules=None`` → the model type's default (restricted to explicit list targets, so the subset
    rule holds); no feedforward module when the model type has no default."""
    assert isinstance(config, IA3Config)
    if config.feedforward_modules is not None:
        return {}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    feedforward = default_ia3_feedforward(model_type) or set()
    if isinstance(config.target_modules, set):
        feedforward &= config.target_modules
    return {"feedforward_modules": feedforward}


IA3 = register_method(
    MethodSpec(
        peft_type=PeftType.IA3,
        prefix="ia3_",
        config_cls=IA3Config,
        tuner_name="IA3Model",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_ia3_targets,
        identity_at_init=True,
        mergeable=True,
        example_configs=({}, {"feedforward_modules": ".*"}),
        non_identity_kwargs={"init_ia3_weights": False},
        combine=add_weighted_adapter,
        resolve_config=_resolve_config,
        supported_kinds=(LINEAR, QUANT_LINEAR, HF_CONV1D, CONV),
        layer_cls=IA3Layer,  # not mixed_compatible: the reference's PeftMixedModel refuses IA3
        additive=False,
    )
)

__all__ = ["IA3", "IA3Config", "IA3Layer"]
