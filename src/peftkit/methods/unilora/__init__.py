"""Uni-LoRA (every layer's LoRA factors gathered from one shared trainable vector): registration with the registry.

``theta_d`` is held once per model by the tuner (``MethodSpec.shared_state``) and saved once as
``base_model.unilora_theta_d``; each layer's fixed indices and scales are regenerated from ``proj_seed`` on load,
or saved per layer with ``save_indices`` (the reference's keys ``<module>.unilora_indices_A`` etc.).
"""

from __future__ import annotations

from typing import Any

import torch

from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import UniLoraConfig
from .indices import UniLoraTunerMixin, assign_indices, balanced_indices
from .layers import UNILORA_KINDS, UniLoraLayer, attach_shared_theta, create_layer, layer_options


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, None]:
    """For ``peftkit inspect``: ``([out, in], r, ‖B A‖_F, None)`` of one layer from its saved indices and scales
    (``save_indices=True``) and the model's ``unilora_theta_d`` (passed beside every layer's tensors)."""
    theta = params["unilora_theta_d"].double()
    A = theta[params["unilora_indices_A"].long()] * params["unilora_scales_A"].double()
    B = theta[params["unilora_indices_B"].long()] * params["unilora_scales_B"].double()
    return [B.shape[0], A.shape[1]], A.shape[0], float((B @ A).norm()), None


UNILORA = register_method(
    MethodSpec(
        peft_type=PeftType.UNILORA,
        prefix="unilora_",
        config_cls=UniLoraConfig,
        tuner_name="UniLoraModel",
        create_layer=create_layer,
        layer_options=layer_options,
        default_targets=default_lora_targets,  # the reference's table is a copy of LoRA's
        identity_at_init=False,  # theta_d is random and feeds both A and B: B A != 0 from the start, as the reference
        mergeable=True,
        example_configs=(
            # a larger bound than the default 0.02 so that the (never identity) update is visible in tiny models; a
            # theta_d longer than the factors (each entry used at most once, scale 1), then one shared by many entries
            {"r": 2, "theta_d_length": 1024, "init_theta_d_bound": 0.5},
            {"r": 3, "theta_d_length": 64, "proj_seed": 7, "unilora_dropout": 0.1, "init_theta_d_bound": 0.5,
             "save_indices": True},
        ),
        supported_kinds=UNILORA_KINDS,
        layer_cls=UniLoraLayer,
        shared_state=attach_shared_theta,
        update_strength=_update_strength,
        tuner_mixin=UniLoraTunerMixin,
    )
)

__all__ = ["UNILORA", "UniLoraConfig", "UniLoraLayer", "assign_indices", "balanced_indices"]
