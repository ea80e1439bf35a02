"""RoAd (2-D rotation adaptation): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError
from ...layers.dispatch import LINEAR, QUANT_LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import RoadConfig
from .layers import RoadLayer
from .rotation import road_coefficients

#: the module kinds RoAd wraps (the reference: ``nn.Linear`` and its bitsandbytes 8-bit / 4-bit linears)
ROAD_KINDS = (LINEAR, QUANT_LINEAR)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the layer kind. Raises for non-linear modules and for ``out_features`` not divisible by
    ``group_size`` (pairs are formed within groups)."""
    assert isinstance(config, RoadConfig)
    kind = require_kind(name, module, ROAD_KINDS, "RoAd")
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if base.out_features % config.group_size:
        raise ConfigError("group_size", config.group_size,
                          f"a divisor of out_features ({base.out_features}) of target module {name!r}")
    return {"kind": kind}


def _create_layer(
    module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str, dtype: torch.dtype
) -> RoadLayer:
    assert isinstance(config, RoadConfig)
    layer = module if isinstance(module, RoadLayer) else RoadLayer(module)
    layer.update_layer(adapter_name, config.variant, config.group_size, config.init_weights, dtype=dtype)
    return layer


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([out, out], None, ‖R - I‖_F, None)`` of one layer's saved angles and scales (the
    update of the output; ``W`` itself is not in the file)."""
    variant, group_size = config.get("variant", "road_1"), int(config.get("group_size", 64))
    cos, sin = road_coefficients(variant, group_size, params["road_theta"].double(), params["road_alpha"].double())
    out = cos.numel()
    strength = ((cos - 1).pow(2).sum() + sin.pow(2).sum()).sqrt()  # each 2x2 block: diagonal c, off-diagonal ∓s
    return [out, out], None, float(strength), None


ROAD = register_method(
    MethodSpec(
        peft_type=PeftType.ROAD,
        prefix="road_",
        config_cls=RoadConfig,
        tuner_name="RoadModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,  # the reference's table is a copy of LoRA's
        identity_at_init=True,
        mergeable=True,
        example_configs=({"group_size": 2}, {"variant": "road_4", "group_size": 2}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=ROAD_KINDS,
        # not mixed_compatible: the reference's PeftMixedModel refuses RoAd (not in its COMPATIBLE_TUNER_TYPES)
        layer_cls=RoadLayer,
        additive=False,  # several adapters compose (rotations multiply)
        update_strength=_update_strength,
    )
)

__all__ = ["ROAD", "RoadConfig", "RoadLayer"]
