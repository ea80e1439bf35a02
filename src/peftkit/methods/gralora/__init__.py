"""GraLoRA (granular low-rank adaptation): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError
from ...layers.dispatch import HF_CONV1D, LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .blocks import gralora_delta
from .config import GraloraConfig
from .layers import GraloraLayer

#: the module kinds GraLoRA wraps (the reference: ``nn.Linear`` and transformers' ``Conv1D``)
GRALORA_KINDS = (LINEAR, HF_CONV1D)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the kind and ``fan_in_fan_out`` (True exactly for ``Conv1D``, whatever the config says, as
    the reference's correction). Raises for other module types and for ``in`` / ``out`` not divisible by
    ``gralora_k``."""
    assert isinstance(config, GraloraConfig)
    kind = require_kind(name, module, GRALORA_KINDS, "GraLoRA")
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    in_features, out_features = base.weight.shape if kind == HF_CONV1D else (base.in_features, base.out_features)
    for side, size in (("in_features", in_features), ("out_features", out_features)):
        if size % config.gralora_k:
            raise ConfigError("gralora_k", config.gralora_k,
                              f"a divisor of {side} ({size}) of target module {name!r} (the weight is split into "
                              "gralora_k x gralora_k blocks)")
    return {"kind": kind, "fan_in_fan_out": kind == HF_CONV1D}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> GraloraLayer:
    assert isinstance(config, GraloraConfig)
    layer = module if isinstance(module, GraloraLayer) else GraloraLayer(module, options["fan_in_fan_out"])
    layer.update_layer(adapter_name, config.r, config.hybrid_r, config.alpha, config.gralora_k,
                       config.gralora_dropout, config.init_weights, dtype=dtype)
    return layer


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([out, in], r + hybrid_r, ‖ΔW‖_F, None)`` of one layer's saved factors (``params``
    named without the ``.weight`` suffix: ``gralora_A_general``)."""
    r, hybrid_r = int(config.get("r", 32)), int(config.get("hybrid_r", 0))
    scaling = float(config.get("alpha", 64)) / (r + hybrid_r)
    a_g, b_g = params.get("gralora_A_general"), params.get("gralora_B_general")
    delta = gralora_delta(params["gralora_A"].double(), params["gralora_B"].double(), scaling,
                          None if a_g is None else a_g.double(), None if b_g is None else b_g.double())
    return list(delta.shape), r + hybrid_r, float(delta.norm()), None


GRALORA = register_method(
    MethodSpec(
        peft_type=PeftType.GRALORA,
        prefix="gralora_",
        config_cls=GraloraConfig,
        tuner_name="GraloraModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,  # the reference's table is a copy of LoRA's
        identity_at_init=True,
        mergeable=True,
        example_configs=({"r": 4, "alpha": 8, "gralora_k": 2},
                         {"r": 4, "hybrid_r": 2, "gralora_k": 2, "gralora_dropout": 0.1, "bias": "gralora_only"}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=GRALORA_KINDS,
        # not mixed_compatible: the reference's PeftMixedModel refuses GraLoRA (not in COMPATIBLE_TUNER_TYPES)
        layer_cls=GraloraLayer,
        update_strength=_update_strength,
    )
)

__all__ = ["GRALORA", "GraloraConfig", "GraloraLayer"]
