"""HRA (Householder reflection adaptation): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import UnsupportedModuleError
from ...layers.dispatch import CONV, LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import HRAConfig
from .householder import householder_factors
from .layers import HRALayer


class HRAGroupedConvError(UnsupportedModuleError, NotImplementedError):
    """A grouped convolution targeted by HRA (the reference raises ``NotImplementedError``)."""


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the kind (``nn.Linear`` or an ungrouped ``nn.Conv1d/2d/3d``) and the rank."""
    assert isinstance(config, HRAConfig)
    kind = require_kind(name, module, (LINEAR, CONV), "HRA")
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if kind == CONV and base.groups > 1:
        raise HRAGroupedConvError(
            f"HRA does not support grouped convolutions: target module {name!r} has groups={base.groups}"
        )
    return {"kind": kind, "r": config.r}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> HRALayer:
    assert isinstance(config, HRAConfig)
    layer = module if isinstance(module, HRALayer) else HRALayer(module)
    layer.update_layer(adapter_name, r=options["r"], apply_gs=config.apply_GS, init_weights=config.init_weights,
                       dtype=dtype)
    return layer



def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([n, n], r, ‖R - I‖_F, None)`` of one layer's saved ``hra_u: (n, r)``, with
    ``R - I = -P Qᵀ`` and ``‖P Qᵀ‖_F² = Σ (PᵀP) ⊙ (QᵀQ)`` (no dense ``(n, n)`` matrix)."""
    u = params["hra_u"].double()
    p, q = householder_factors(u, bool(config.get("apply_GS", False)))
    strength = ((p.t() @ p) * (q.t() @ q)).sum().clamp_min(0).sqrt()
    return [u.shape[0], u.shape[0]], u.shape[1], float(strength), None

HRA = register_method(
    MethodSpec(
        peft_type=PeftType.HRA,
        prefix="hra_",
        config_cls=HRAConfig,
        tuner_name="HRAModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,  # the reference's HRA table is a copy of LoRA's
        identity_at_init=True,  # with the default init and an even r (the example configs)
        mergeable=True,
        # high ranks: random rotations of q/v move the tiny BERT's logits (~1e-2) by only ~1e-5 at r=2, 1e-4 at r=8
        example_configs=({"r": 16}, {"r": 12, "bias": "hra_only"}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=(LINEAR, CONV),
        layer_cls=HRALayer,
        update_strength=_update_strength,
        additive=False,
        pattern_fields=(),
    )
)

__all__ = ["HRA", "HRAConfig", "HRAGroupedConvError", "HRALayer"]
