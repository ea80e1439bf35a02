"""MiSS (matrix shard sharing, formerly Bone): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig, check
from ...layers.dispatch import LINEAR, QUANT_LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import MissConfig
from .layers import BAT, MINI, MissLayer, mode_of


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts, and the reference's per-layer checks of ``r`` / ``mini_r`` against the layer's shape
    (``ConfigError``, a ``ValueError`` as the reference raises, naming the field and the module)."""
    assert isinstance(config, MissConfig)
    kind = require_kind(name, module, (LINEAR, QUANT_LINEAR), "MiSS")
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    r, n_in, n_out = config.r, base.in_features, base.out_features
    check(r <= n_in, "r", r, f"r must be <= in_features of every target; {name!r} has in_features={n_in}")
    mode = mode_of(config.init_weights)
    check(mode != BAT or (n_in % r == 0 and n_out % r == 0), "r", r,
          f"init_weights='bat' needs in_features and out_features divisible by r; {name!r} is "
          f"({n_out}, {n_in})")
    check(mode != MINI or n_out % config.mini_r == 0, "mini_r", config.mini_r,
          f"init_weights='mini' needs out_features divisible by mini_r; {name!r} has out_features={n_out}")
    return {"kind": kind, "r": r}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> MissLayer:
    assert isinstance(config, MissConfig)
    layer = module if isinstance(module, MissLayer) else MissLayer(module)
    layer.update_layer(adapter_name, r=options["r"], mini_r=config.mini_r, init_weights=config.init_weights,
                       dropout=config.miss_dropout, dtype=dtype)
    return layer



def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``(shape of miss_block, None, ‖miss_block‖_F, None)``. The dense update also depends
    on the layer's width (every column shard shares the block) or, for ``"bat"``, on the base weight, neither of
    which is in the adapter file, so the block's own norm is what a file alone can tell."""
    block = params["miss_block"].double()
    return list(block.shape), None, float(block.norm()), None

MISS = register_method(
    MethodSpec(
        peft_type=PeftType.MISS,
        prefix="miss_",
        config_cls=MissConfig,
        tuner_name="MissModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,  # the reference's MiSS table is a copy of LoRA's
        identity_at_init=True,
        mergeable=True,
        example_configs=({"r": 4}, {"r": 2, "init_weights": "bat"}, {"r": 4, "init_weights": "mini", "mini_r": 2,
                                                                       "miss_dropout": 0.1}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=(LINEAR, QUANT_LINEAR),
        layer_cls=MissLayer,
        update_strength=_update_strength,
        pattern_fields=(),
    )
)

__all__ = ["MISS", "MissConfig", "MissLayer"]
