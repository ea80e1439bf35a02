"""LoKr (low-rank Kronecker product): registration of the method with the registry."""

from __future__ import annotations

from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from ..lycoris import LYCORIS_KINDS, lycoris_create_layer, lycoris_layer_options
from .config import LoKrConfig
from .layers import LoKrLayer

LOKR = register_method(
    MethodSpec(
        peft_type=PeftType.LOKR,
        prefix="lokr_",
        config_cls=LoKrConfig,
        tuner_name="LoKrModel",
        create_layer=lycoris_create_layer(LoKrLayer),
        layer_options=lycoris_layer_options("LoKr", LoKrLayer),
        default_targets=default_lora_targets,
        identity_at_init=True,
        mergeable=True,
        example_configs=(
            {"r": 1, "alpha": 2, "decompose_factor": 1},  # w1 1x1, w2 low-rank: shapes depend on r
            {"r": 1, "alpha": 2, "decompose_both": True, "decompose_factor": 4, "use_effective_conv2d": True,
             "rank_dropout": 0.1, "rank_dropout_scale": True, "init_weights": "lycoris"},
        ),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=LYCORIS_KINDS,
        mixed_compatible=True,
        layer_cls=LoKrLayer,
    )
)

__all__ = ["LOKR", "LoKrConfig", "LoKrLayer"]
