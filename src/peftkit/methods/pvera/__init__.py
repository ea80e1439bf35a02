"""PVeRA (probabilistic VeRA): registration of the method with the registry.

The shared projections, their binding to the layers, their checkpoint entries (``base_model.pvera_A`` /
``base_model.pvera_B``, or none with ``save_projection=False``: the seed regenerates them) and the compatibility
checks of further adapters are VeRA's (:data:`~peftkit.methods.vera.SharedProjectionSpec` hooks), with PVeRA's
projections object (``A`` has ``2r`` rows) and names.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...layers.dispatch import HF_CONV1D, LINEAR, QUANT_LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...types import PeftType
from ..vera import (
    SharedProjectionSpec,
    _bind_projections,
    _convert_checkpoint,
    _export_state,
    default_vera_targets,
)
from .config import PveraConfig
from .layers import PveraLayer, PveraProjections

#: the module kinds PVeRA wraps (the reference: ``nn.Linear``, bitsandbytes 8-bit / 4-bit linears, transformers'
#: ``Conv1D``)
PVERA_KINDS = (LINEAR, QUANT_LINEAR, HF_CONV1D)
#: checkpoint names of the shared projections (after the tuner's prefix, ``base_model.``)
PVERA_PROJECTION_KEYS = ("pvera_A", "pvera_B")

PVERA_SHARED = SharedProjectionSpec(
    "PVeRA", PveraConfig, PveraLayer,
    lambda c, i, o, d: PveraProjections(c.projection_prng_key, c.r, i, o, c.save_projection, device=d),
    PVERA_PROJECTION_KEYS)


def default_pvera_targets(model_type: str | None) -> set[str] | str | None:
    """The reference's table: VeRA's, plus ``dinov2`` (``query``, ``value``)."""
    if model_type == "dinov2":
        return {"query", "value"}
    return default_vera_targets(model_type)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the layer kind and ``fan_in_fan_out`` (detected: True exactly for ``Conv1D``)."""
    kind = require_kind(name, module, PVERA_KINDS, "PVeRA")
    return {"kind": kind, "fan_in_fan_out": kind == HF_CONV1D}


def _create_layer(
    module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str, dtype: torch.dtype
) -> PveraLayer:
    assert isinstance(config, PveraConfig)
    layer = module if isinstance(module, PveraLayer) else PveraLayer(module, options["fan_in_fan_out"])
    layer.update_layer(adapter_name, config.r, config.pvera_dropout, config.init_weights, config.d_initial,
                       config.sample_at_inference, config.generator_seed, dtype=dtype)
    return layer


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([out, r], r, strength, None)`` of the merged (mean) update from the saved vectors
    alone, as VeRA's: ``E‖diag(λ_b) B diag(λ_d[:r]) A[:r]‖_F ≈ ‖λ_b‖ ‖λ_d[:r]‖ · 2 / sqrt(r)`` (kaiming-uniform
    projections, a layer as wide as the widest adapted one)."""
    lambda_b, lambda_d = params["pvera_lambda_b"].double(), params["pvera_lambda_d"].double()
    r = lambda_d.numel() // 2
    strength = float(lambda_b.norm() * lambda_d[:r].norm() * 2.0 / math.sqrt(r))
    return [lambda_b.numel(), r], r, strength, None


PVERA = register_method(
    MethodSpec(
        peft_type=PeftType.PVERA,
        prefix="pvera_lambda_",
        config_cls=PveraConfig,
        tuner_name="PveraModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_pvera_targets,
        identity_at_init=True,
        mergeable=True,
        example_configs=({"r": 4}, {"r": 8, "d_initial": 0.5, "save_projection": False, "generator_seed": 3}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=PVERA_KINDS,
        layer_cls=PveraLayer,
        extra_layers=partial(_bind_projections, method=PVERA_SHARED),
        export_state=partial(_export_state, method=PVERA_SHARED),
        convert_checkpoint=partial(_convert_checkpoint, method=PVERA_SHARED),
        pattern_fields=(),
        update_strength=_update_strength,
    )
)

__all__ = ["PVERA", "PVERA_SHARED", "PveraConfig", "PveraLayer", "PveraProjections"]
