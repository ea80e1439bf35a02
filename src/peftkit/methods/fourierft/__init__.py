"""FourierFT (spectral coefficients at fixed random frequencies): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError
from ...injection.match import pattern_value
from ...layers.dispatch import HF_CONV1D, LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import FourierFTConfig
from .layers import FourierFTLayer

#: the module kinds FourierFT wraps (the reference: ``nn.Linear`` and transformers' ``Conv1D``)
FOURIERFT_KINDS = (LINEAR, HF_CONV1D)

#: the reference's default targets: LoRA's table with GPT-2 / GPT-BigCode on ``mlp.c_proj`` only
_OVERRIDES: dict[str, set[str]] = {"gpt2": {"mlp.c_proj"}, "gpt_bigcode": {"mlp.c_proj"}}


def default_fourierft_targets(model_type: str | None) -> set[str] | str | None:
    """The reference's ``TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING`` for ``model_type``."""
    if model_type in _OVERRIDES:
        return set(_OVERRIDES[model_type])
    return default_lora_targets(model_type)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the kind, ``n_frequency`` after ``n_frequency_pattern`` (at most ``out * in``) and
    ``fan_in_fan_out`` (True exactly for ``Conv1D``, whatever the config says, as the reference's correction)."""
    assert isinstance(config, FourierFTConfig)
    kind = require_kind(name, module, FOURIERFT_KINDS, "FourierFT")
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    n_frequency = pattern_value(config.n_frequency_pattern or {}, name, config.n_frequency)
    size = base.weight.numel()
    if n_frequency > size:
        field = "n_frequency" if n_frequency == config.n_frequency else "n_frequency_pattern"
        raise ConfigError(field, n_frequency,
                          f"at most in_features * out_features = {size} of target module {name!r}")
    return {"kind": kind, "n_frequency": n_frequency, "fan_in_fan_out": kind == HF_CONV1D}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> FourierFTLayer:
    assert isinstance(config, FourierFTConfig)
    layer = module if isinstance(module, FourierFTLayer) else FourierFTLayer(module, options["fan_in_fan_out"])
    layer.update_layer(adapter_name, options["n_frequency"], config.scaling, config.random_loc_seed,
                       config.init_weights, dtype=dtype)
    return layer


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([n], None, scaling · ‖spectrum‖₂, None)``. The file holds neither the layer's
    shape nor the frequency locations, so this is the norm of the scaled spectrum, which by Parseval equals
    ``‖IFFT2(S) · scaling‖_F · sqrt(out · in)`` (``ΔW`` is its real part)."""
    spectrum = params["fourierft_spectrum"].double()
    return [spectrum.numel()], None, float(spectrum.norm() * float(config.get("scaling", 150.0))), None


FOURIERFT = register_method(
    MethodSpec(
        peft_type=PeftType.FOURIERFT,
        prefix="fourierft_",
        config_cls=FourierFTConfig,
        tuner_name="FourierFTModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_fourierft_targets,
        identity_at_init=False,  # the reference's default init_weights=False draws the spectrum from N(0, 1)
        mergeable=True,
        # tiny models: few frequencies and a small scaling keep the random update a small perturbation
        example_configs=({"n_frequency": 16, "scaling": 10.0},
                         {"n_frequency": 8, "scaling": 40.0, "random_loc_seed": 3, "bias": "fourier_only"}),
        supported_kinds=FOURIERFT_KINDS,
        # not mixed_compatible: the reference's PeftMixedModel refuses FourierFT (not in COMPATIBLE_TUNER_TYPES)
        layer_cls=FourierFTLayer,
        pattern_fields=("n_frequency_pattern",),
        update_strength=_update_strength,
    )
)

__all__ = ["FOURIERFT", "FourierFTConfig", "FourierFTLayer", "default_fourierft_targets"]
