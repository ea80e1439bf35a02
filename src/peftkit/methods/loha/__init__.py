"""LoHa (low-rank Hadamard product): registration of the method with the registry."""

from __future__ import annotations

from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from ..lycoris import LYCORIS_KINDS, lycoris_create_layer, lycoris_layer_options
from .config import LoHaConfig
from .layers import LoHaLayer

LOHA = register_method(
    MethodSpec(
        peft_type=PeftType.LOHA,
        prefix="hada_",
        config_cls=LoHaConfig,
        tuner_name="LoHaModel",
        create_layer=lycoris_create_layer(LoHaLayer),
        layer_options=lycoris_layer_options("LoHa", LoHaLayer),
        default_targets=default_lora_targets,
        identity_at_init=True,
        mergeable=True,
        example_configs=(
            {"r": 4, "alpha": 8},
            {"r": 2, "alpha": 4, "use_effective_conv2d": True, "rank_dropout": 0.1},
        ),
        non_identity_kwargs={"init_weights": False, "alpha": 64},  # Hadamard products start tiny
        supported_kinds=LYCORIS_KINDS,
        mixed_compatible=True,
        layer_cls=LoHaLayer,
    )
)

__all__ = ["LOHA", "LoHaConfig", "LoHaLayer"]
