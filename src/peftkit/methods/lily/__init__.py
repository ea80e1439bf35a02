"""Lily (low-rank interconnected adaptation across layers): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...layers.dispatch import LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import LilyConfig
from .layers import LilyLayer, LilyMergeError, group_key, mixed_experts, share_across_layers

#: the module kinds Lily wraps (the reference: ``nn.Linear`` only)
LILY_KINDS = (LINEAR,)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    kind = require_kind(name, module, LILY_KINDS, "Lily")
    return {"kind": kind}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> LilyLayer:
    assert isinstance(config, LilyConfig)
    layer = module if isinstance(module, LilyLayer) else LilyLayer(module)
    layer.update_layer(adapter_name, config, dtype=dtype)
    return layer


def _share(tuner: nn.Module, config: PeftConfig, adapter_name: str, layers: list[nn.Module]) -> None:
    """After injection: the layers of each (target, shape) group share ``lily_B`` and, per ``stride_A`` run, ``lily_A``
    (:func:`share_across_layers`), in the model's module order."""
    held = {id(layer) for layer in layers}
    named = [(n, m) for n, m in tuner.model.named_modules() if id(m) in held and isinstance(m, LilyLayer)]
    share_across_layers(named, config.target_modules, adapter_name)


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([out, in], r, ‖ΔW‖_F, None)`` with the experts mixed uniformly (the router's
    weights depend on the batch, so a file alone fixes no ``ΔW``): ``ΔW = scaling · B̄ᵀ A``."""
    A = params["lily_A"].double()  # (r, in)
    experts = params["lily_B"].double()  # (num_B * r, out)
    num_b = experts.shape[0] // A.shape[0]
    uniform = torch.full((1, num_b), 1.0 / num_b, dtype=torch.float64)
    combined = mixed_experts(uniform, experts, float(config.get("scaling", 1.0)))  # (r, out)
    return [experts.shape[1], A.shape[1]], A.shape[0], float((combined.t() @ A).norm()), None


LILY = register_method(
    MethodSpec(
        peft_type=PeftType.LILY,
        prefix="lily_",
        config_cls=LilyConfig,
        tuner_name="LilyModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,  # the reference's table is a copy of LoRA's
        identity_at_init=True,
        mergeable=False,
        example_configs=({"r": 4, "num_B": 2}, {"r": 2, "stride_A": 2, "num_B": 3, "scaling": 0.5}),
        # Kaiming-uniform B through a rank-4 bottleneck is a ~1e-4 change on the tiny heads: scaled up to be seen
        non_identity_kwargs={"init_weights": False, "scaling": 20.0},
        supported_kinds=LILY_KINDS,
        layer_cls=LilyLayer,
        pattern_fields=(),
        update_strength=_update_strength,
        shared_state=_share,
    )
)

__all__ = ["LILY", "LilyConfig", "LilyLayer", "LilyMergeError", "group_key", "share_across_layers"]
