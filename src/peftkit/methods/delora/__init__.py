"""DeLoRA (decoupled low-rank adaptation): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...injection.match import pattern_value
from ...layers.dispatch import LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import DeloraConfig
from .layers import DeloraLayer, delora_scaled_A

#: the module kinds DeLoRA wraps (the reference: ``torch.nn.Linear`` only)
DELORA_KINDS = (LINEAR,)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the kind, ``r`` after ``rank_pattern`` and ``λ`` after ``lambda_pattern``."""
    assert isinstance(config, DeloraConfig)
    require_kind(name, module, (LINEAR,), "DeLoRA")
    return {"kind": LINEAR, "r": pattern_value(config.rank_pattern or {}, name, config.r),
            "delora_lambda": pattern_value(config.lambda_pattern or {}, name, config.delora_lambda)}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> DeloraLayer:
    assert isinstance(config, DeloraConfig)
    layer = module if isinstance(module, DeloraLayer) else DeloraLayer(module)
    layer.update_layer(adapter_name, options["r"], options["delora_lambda"], config.module_dropout,
                       config.init_weights, dtype=dtype)
    return layer


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([out, in], r, ‖ΔW‖_F, None)`` of one layer from its saved tensors."""
    A, B = params["delora_A"].double(), params["delora_B"].double()
    r = A.shape[0]
    delta = B @ delora_scaled_A(A, B, params["delora_lambda"].double(), r, params["delora_w_norm"].double())
    return [B.shape[0], A.shape[1]], r, float(delta.norm()), None


DELORA = register_method(
    MethodSpec(
        peft_type=PeftType.DELORA,
        prefix="delora_",
        config_cls=DeloraConfig,
        tuner_name="DeloraModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,  # the reference's table is a copy of LoRA's
        identity_at_init=True,
        mergeable=True,
        example_configs=({"r": 4, "delora_lambda": 5}, {"r": 2, "module_dropout": 0.1, "bias": "delora_only"}),
        non_identity_kwargs={"init_weights": False, "delora_lambda": 30},  # tiny models: column norms ~0.1
        supported_kinds=DELORA_KINDS,
        # not mixed_compatible: the reference's PeftMixedModel refuses DeLoRA (not in its COMPATIBLE_TUNER_TYPES)
        layer_cls=DeloraLayer,
        pattern_fields=("rank_pattern", "lambda_pattern"),
        update_strength=_update_strength,
    )
)

__all__ = ["DELORA", "DeloraConfig", "DeloraLayer"]
