"""C3A (circular convolution adaptation): registration of the method with the registry."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError
from ...injection.match import pattern_value
from ...layers.dispatch import LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...types import PeftType
from ..fourierft import default_fourierft_targets
from .config import C3AConfig
from .layers import C3ALayer

#: the module kinds C3A wraps (the reference: ``nn.Linear`` only)
C3A_KINDS = (LINEAR,)

#: the reference's ``TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING`` is FourierFT's table (LoRA's, with GPT-2 /
#: GPT-BigCode on ``mlp.c_proj``)
default_c3a_targets = default_fourierft_targets


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: ``block_size`` after ``block_size_pattern``, which must divide ``in`` and ``out``."""
    assert isinstance(config, C3AConfig)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    require_kind(name, module, C3A_KINDS, "C3A")
    block_size = pattern_value(config.block_size_pattern or {}, name, config.block_size)
    if base.in_features % block_size or base.out_features % block_size:
        field = "block_size" if block_size == config.block_size else "block_size_pattern"
        raise ConfigError(field, block_size, f"a divisor of in_features ({base.in_features}) and out_features "
                                             f"({base.out_features}) of target module {name!r}")
    return {"block_size": block_size}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> C3ALayer:
    """Wrap ``module`` (or reuse its layer) and add the adapter; the kernel is float32 whatever ``dtype`` (as the
    reference)."""
    assert isinstance(config, C3AConfig)
    layer = module if isinstance(module, C3ALayer) else C3ALayer(module)
    layer.update_layer(adapter_name, options["block_size"], config.init_weights)
    return layer


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([out, in], None, ‖ΔW‖_F, None)`` from the kernel alone: ``(M, N, b)`` gives
    ``out = M b``, ``in = N b``, and each entry fills ``b`` cells of ``ΔW`` scaled by ``1 / in``."""
    kernel = params["c3a_kernel"].double()
    m, n, b = kernel.shape
    return [m * b, n * b], None, float(kernel.norm() * math.sqrt(b) / (n * b)), None


C3A = register_method(
    MethodSpec(
        peft_type=PeftType.C3A,
        prefix="c3a_",
        config_cls=C3AConfig,
        tuner_name="C3AModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_c3a_targets,
        identity_at_init=False,  # the reference's default init_weights="xavier_uniform" draws the kernel
        mergeable=True,
        # block size 2 divides every linear of the tiny models
        example_configs=({"block_size": 2},
                         {"block_size": 2, "init_weights": "kaiming_uniform", "bias": "c3a_only"}),
        non_identity_kwargs={"init_weights": "gaussian"},
        supported_kinds=C3A_KINDS,
        # not mixed_compatible: the reference's PeftMixedModel refuses C3A (not in COMPATIBLE_TUNER_TYPES)
        layer_cls=C3ALayer,
        pattern_fields=("block_size_pattern",),
        update_strength=_update_strength,
    )
)

__all__ = ["C3A", "C3AConfig", "C3ALayer", "default_c3a_targets"]
