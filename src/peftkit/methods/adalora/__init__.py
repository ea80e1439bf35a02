"""AdaLoRA (adaptive-rank LoRA in SVD form): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError, UnsupportedModuleError
from ...layers.dispatch import CONV, HF_CONV1D, LINEAR, module_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_adalora_targets
from ...types import PeftType
from ..lora import _check_config as _check_lora_config
from .allocator import RankAllocator, budget_schedule
from .config import AdaLoraConfig
from .layers import SVDLayer
from .model import AdaLoraTunerMixin, export_state, orthogonal_regularization, prepare_load
from .training import AdaLoraStepHook, attach_adalora

SUPPORTED_KINDS = (LINEAR, HF_CONV1D, CONV)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the layer kind, the initial rank / alpha (every layer starts at ``init_r``) and
    ``fan_in_fan_out`` (detected)."""
    assert isinstance(config, AdaLoraConfig)
    kind = module_kind(module)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if kind not in SUPPORTED_KINDS or (kind == CONV and base.groups != 1):
        raise UnsupportedModuleError(
            f"target module {name!r} is a {type(base).__name__}; AdaLoRA supports nn.Linear, transformers' Conv1D "
            "and nn.Conv1d/2d/3d with groups=1. Adjust target_modules."
        )
    return {"kind": kind, "r": config.init_r, "lora_alpha": config.lora_alpha, "fan_in_fan_out": kind == HF_CONV1D}


def _create_layer(
    module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str, dtype: torch.dtype
) -> SVDLayer:
    assert isinstance(config, AdaLoraConfig)
    layer = module if isinstance(module, SVDLayer) else SVDLayer(module, options["kind"])
    layer.update_layer(adapter_name, r=options["r"], lora_alpha=options["lora_alpha"],
                       lora_dropout=config.lora_dropout, init_lora_weights=bool(config.init_lora_weights), dtype=dtype)
    return layer


def _check_config(config: PeftConfig, model: nn.Module) -> None:
    """LoRA's checks, plus the LoRA features the SVD layer does not have."""
    assert isinstance(config, AdaLoraConfig)
    _check_lora_config(config, model)
    for name, inert in (("use_rslora", False), ("lora_bias", False)):
        if getattr(config, name) != inert:
            raise ConfigError(name, getattr(config, name), f"AdaLoRA does not implement {name}; allowed: {inert!r}")
    if config.alpha_pattern:
        raise ConfigError("alpha_pattern", config.alpha_pattern, "AdaLoRA does not implement alpha_pattern; "
                          "allowed: {}")


ADALORA = register_method(
    MethodSpec(
        peft_type=PeftType.ADALORA,
        prefix="lora_",
        config_cls=AdaLoraConfig,
        tuner_name="AdaLoraModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_adalora_targets,
        check_config=_check_config,
        identity_at_init=True,
        mergeable=True,
        example_configs=(
            {"init_r": 4, "target_r": 2, "total_step": 10, "lora_alpha": 8},
            {"init_r": 3, "target_r": 1, "total_step": 20, "tinit": 2, "tfinal": 3, "lora_dropout": 0.1,
             "orth_reg_weight": 0.1},
        ),
        non_identity_kwargs={"init_lora_weights": False, "lora_alpha": 1},  # N(0, 1) factors: keep ΔW small
        combine=None,
        supported_kinds=SUPPORTED_KINDS,
        tuner_mixin=AdaLoraTunerMixin,
        loss_term=orthogonal_regularization,
        export_state=export_state,
        prepare_load=prepare_load,
        pattern_fields=("alpha_pattern",),  # rank_pattern: surviving-rank masks keyed "<module>.lora_E"
        rank_field="init_r",
        mixed_compatible=True,
        layer_cls=SVDLayer,
    )
)

__all__ = [
    "ADALORA",
    "AdaLoraConfig",
    "AdaLoraStepHook",
    "RankAllocator",
    "SVDLayer",
    "attach_adalora",
    "budget_schedule",
]
