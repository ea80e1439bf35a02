"""WaveFT (sparse wavelet coefficients at fixed random positions): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError, UnsupportedModuleError
from ...injection.match import pattern_value
from ...layers.dispatch import HF_CONV1D, LINEAR, module_kind
from ...registry import MethodSpec, register_method
from ...types import PeftType
from ..fourierft import default_fourierft_targets
from .config import WaveFTConfig
from .layers import WaveFTLayer
from .wavelets import WAVELET_FAMILIES

#: the module kinds WaveFT wraps (the reference: ``nn.Linear`` and transformers' ``Conv1D``)
WAVEFT_KINDS = (LINEAR, HF_CONV1D)

#: model types of FourierFT's table that the reference's WaveFT table lacks
_NOT_IN_TABLE = frozenset({"rwkv", "rwkv7", "btlm"})


def default_waveft_targets(model_type: str | None) -> set[str] | str | None:
    """The reference's ``TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING`` for ``model_type`` (FourierFT's
    table without RWKV and BTLM)."""
    return None if model_type in _NOT_IN_TABLE else default_fourierft_targets(model_type)


def _n_frequency(name: str, weight_size: int, config: WaveFTConfig) -> int:
    """``n_frequency`` of module ``name`` after ``n_frequency_pattern``; more than the weight's entries is an error
    (with ``proportional_parameters`` the count comes later, from :func:`_plan_options`)."""
    value = pattern_value(config.n_frequency_pattern or {}, name, config.n_frequency)
    if value <= weight_size or config.proportional_parameters:
        return value
    raise ConfigError("n_frequency" if value == config.n_frequency else "n_frequency_pattern", value,
                      f"at most in_features * out_features = {weight_size} of target module {name!r}")


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the kind, ``n_frequency`` and ``fan_in_fan_out`` (True exactly for ``Conv1D``, whatever the
    config says: the reference corrects it so)."""
    assert isinstance(config, WaveFTConfig)
    kind = module_kind(module)
    if kind in WAVEFT_KINDS:
        weight = (module.get_base_layer() if hasattr(module, "get_base_layer") else module).weight
        return {"kind": kind, "n_frequency": _n_frequency(name, weight.numel(), config),
                "fan_in_fan_out": kind == HF_CONV1D}
    raise UnsupportedModuleError(f"target module {name!r} is a {type(module).__name__}; WaveFT wraps nn.Linear and "
                                 "transformers' Conv1D only. Adjust target_modules.")


def _plan_options(config: PeftConfig, planned: list[tuple[str, nn.Module, dict[str, Any]]]) -> list[dict[str, Any]]:
    """``proportional_parameters``: ``n_frequency · #layers`` coefficients spread over the planned layers in
    proportion to ``out · in``, ``max(1, round(...))`` each (the reference's arithmetic, in its order); it overrides
    ``n_frequency_pattern``. Without it the options stay as they are."""
    assert isinstance(config, WaveFTConfig)
    if not config.proportional_parameters:
        return [options for _, _, options in planned]
    sizes = [(module.get_base_layer() if hasattr(module, "get_base_layer") else module).weight.numel()
             for _, module, _ in planned]
    total, budget = sum(sizes), config.n_frequency * len(planned)
    result = []
    for (name, _, options), size in zip(planned, sizes):
        count = max(1, round(size / total * budget))
        if count > size:
            raise ConfigError("proportional_parameters", True,
                              f"it gives target module {name!r} {count} coefficients, more than its "
                              f"in_features * out_features = {size}; lower n_frequency={config.n_frequency}")
        result.append({**options, "n_frequency": count})
    return result


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> WaveFTLayer:
    assert isinstance(config, WaveFTConfig)
    layer = module if isinstance(module, WaveFTLayer) else WaveFTLayer(module, options["fan_in_fan_out"])
    layer.update_layer(adapter_name, options["n_frequency"], config.scaling, config.wavelet_family, config.use_idwt,
                       config.random_loc_seed, config.init_weights, dtype=dtype)
    return layer


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([n], None, scaling · ‖spectrum‖₂, None)``. The file holds neither the layer's
    shape nor the coefficient positions; the wavelet filters are orthonormal, so away from the cropped borders
    ``‖ΔW‖_F`` equals this norm (exactly so for ``db1`` on even sides and without the IDWT)."""
    spectrum = params["waveft_spectrum"].double()
    return [spectrum.numel()], None, float(spectrum.norm() * float(config.get("scaling", 25.0))), None


WAVEFT = register_method(
    MethodSpec(
        peft_type=PeftType.WAVEFT,
        prefix="waveft_",
        config_cls=WaveFTConfig,
        tuner_name="WaveFTModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_waveft_targets,
        identity_at_init=True,  # init_weights=True (the default) zeroes the coefficients
        mergeable=True,
        # tiny models: few coefficients; the second example: a longer filter (padding, cropping) and no IDWT
        example_configs=({"n_frequency": 16, "scaling": 10.0},
                         {"n_frequency": 12, "scaling": 5.0, "wavelet_family": "sym2", "random_loc_seed": 3,
                          "bias": "waveft_only"}),
        non_identity_kwargs={"init_weights": False, "scaling": 100.0},
        supported_kinds=WAVEFT_KINDS,
        # not mixed_compatible: the reference's PeftMixedModel refuses WaveFT (not in COMPATIBLE_TUNER_TYPES)
        layer_cls=WaveFTLayer,
        pattern_fields=("n_frequency_pattern",),
        update_strength=_update_strength,
        plan_options=_plan_options,
    )
)

__all__ = ["WAVEFT", "WAVELET_FAMILIES", "WaveFTConfig", "WaveFTLayer", "default_waveft_targets"]
