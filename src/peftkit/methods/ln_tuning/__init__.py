"""LN tuning (LayerNorm tuning): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...layers.dispatch import CONV, EMBEDDING, HF_CONV1D, LINEAR, MHA, QUANT_LINEAR, module_kind
from ...registry import MethodSpec, register_method
from ...types import PeftType
from .config import LNTuningConfig
from .layers import LNTuningLayer
from .targets import default_ln_tuning_targets


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Any module can be tuned (the reference copies whatever is targeted); the kind is recorded for inspection."""
    return {"kind": module_kind(module)}


def _create_layer(
    module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str, dtype: torch.dtype
) -> LNTuningLayer:
    """``dtype`` is not used: the copies keep the base module's dtype (the reference skips adapter autocasting)."""
    layer = module if isinstance(module, LNTuningLayer) else LNTuningLayer(module)
    layer.update_layer(adapter_name)
    return layer


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: the copy's shape and the Frobenius norm of its tensors (the base module is not in
    the file, so no difference from it can be measured)."""
    weight = params.get("weight", next(iter(params.values())))
    norm = sum(float(t.double().pow(2).sum()) for t in params.values()) ** 0.5
    return list(weight.shape), None, norm, None


LN_TUNING = register_method(
    MethodSpec(
        peft_type=PeftType.LN_TUNING,
        prefix="ln_tuning_",
        config_cls=LNTuningConfig,
        tuner_name="LNTuningModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_ln_tuning_targets,
        identity_at_init=True,
        mergeable=True,
        example_configs=({},),
        additive=False,  # one adapter's copy replaces the module
        # any module can be tuned; listed: every kind of layers.dispatch (norms have none). Grouped convolutions are
        # left to the norm cases: the conformance suite expects their merge to be refused, which holds for LoRA only
        supported_kinds=(LINEAR, QUANT_LINEAR, HF_CONV1D, EMBEDDING, CONV, MHA),
        layer_cls=LNTuningLayer,  # not mixed_compatible: the reference's PeftMixedModel refuses LN tuning
        update_strength=_update_strength,
    )
)

__all__ = ["LN_TUNING", "LNTuningConfig", "LNTuningLayer"]
