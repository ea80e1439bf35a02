"""BOFT (orthogonal finetuning with butterfly factorization): registration of the method with the registry."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import PeftWarning, UnsupportedModuleError
from ...layers.dispatch import CONV, LINEAR, QUANT_LINEAR, module_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .butterfly import butterfly_perms, cayley, resolve_blocks, rotate_columns
from .config import BOFTConfig
from .layers import BOFTLayer


class GroupedConvError(UnsupportedModuleError, NotImplementedError):
    """BOFT on an ``nn.Conv2d`` with ``groups > 1`` (the reference raises ``NotImplementedError``): the rotation
    acts on all ``in_channels · kh · kw`` inputs of an output channel, which a grouped kernel does not have."""


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the kind (``nn.Linear`` or ``nn.Conv2d``) and the block layout, checked at plan time so a
    width that does not split into the configured blocks fails before any module is replaced."""
    assert isinstance(config, BOFTConfig)
    base = module.get_base_layer() if isinstance(module, BOFTLayer) else module
    kind = module_kind(base)
    if kind in (LINEAR, QUANT_LINEAR) and isinstance(base, nn.Linear):
        n, what = base.in_features, f"in_features ({base.in_features}) of {name!r}"
    elif isinstance(base, nn.Conv2d):
        if base.groups > 1:
            raise GroupedConvError(f"target module {name!r}: BOFT does not support nn.Conv2d layers with groups > 1 "
                                   f"(got groups={base.groups}). Adjust target_modules.")
        n = base.in_channels * math.prod(base.kernel_size)
        what = f"convolutional kernel dimension ({n}) of {name!r}"
    else:
        raise UnsupportedModuleError(
            f"target module {name!r} is a {type(base).__name__}; BOFT supports nn.Linear (also quantized with "
            "bitsandbytes or torchao) and nn.Conv2d. "
            "Adjust target_modules."
        )
    if config.fan_in_fan_out and kind != CONV:
        warnings.warn(f"fan_in_fan_out is set to True but the target module {name!r} is a torch.nn.Linear (BOFT does "
                      "not adapt transformers' Conv1D); it is ignored", PeftWarning, stacklevel=2)
    size, num = resolve_blocks(n, config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor, what)
    return {"kind": kind, "boft_block_size": size, "boft_block_num": num}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> BOFTLayer:
    assert isinstance(config, BOFTConfig)
    layer = module if isinstance(module, BOFTLayer) else BOFTLayer(module)
    layer.update_layer(adapter_name, config, dtype=dtype)
    return layer


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([out, n], None, strength, None)`` of one layer from its saved ``boft_R`` /
    ``boft_s`` alone (``W`` is not in the file): ``strength = sqrt(‖R - I‖_F² + ‖s - 1‖²)``, the rotation's and the
    scale's distances from the identity."""
    rot, scale = params["boft_R"].double(), params["boft_s"].double().flatten()
    factors, blocks, size, _ = rot.shape
    n = blocks * size
    q = cayley(rot.reshape(-1, size, size)).view(rot.shape)
    eye = torch.eye(n, dtype=torch.float64)
    rotation_t = rotate_columns(eye, q, butterfly_perms(n, size, blocks, factors))  # I Rᵀ
    strength = ((rotation_t - eye).pow(2).sum() + (scale - 1).pow(2).sum()).sqrt()
    return [scale.numel(), n], None, float(strength), None


_WRAPPER = "base_model.model."


def _convert_checkpoint(model: nn.Module, state_dict: dict[str, torch.Tensor],
                        adapter_name: str) -> dict[str, torch.Tensor]:
    """Where the checkpoint's ``boft_R`` of a layer has 1 butterfly factor and the layer's adapter more, rebuild the
    layer's adapter with 1 factor, with a warning: the reference silently uses ``boft_n_butterfly_factor=1`` when
    its CUDA extension does not load (every CPU machine) and saves such tensors under a config that says more, and
    its outputs follow the tensors. The checkpoint itself is returned unchanged."""
    by_path = {key.removeprefix(_WRAPPER)[: -len(".boft_R")]: value for key, value in state_dict.items()
               if key.endswith(".boft_R") and value.dim() == 4}
    rebuilt = []
    for name, module in model.named_modules():
        if not isinstance(module, BOFTLayer) or adapter_name not in module.boft_R:
            continue
        value = by_path.get(name.removeprefix(_WRAPPER))
        own = module.boft_R[adapter_name].shape
        if value is not None and value.shape[0] == 1 < own[0] and value.shape[1:] == own[1:]:
            module.set_butterfly_factors(adapter_name, 1)
            rebuilt.append(name.removeprefix(_WRAPPER))
    if rebuilt:
        warnings.warn(
            f"adapter {adapter_name!r}: the checkpoint's boft_R has 1 butterfly factor where its config says more "
            f"(boft_n_butterfly_factor is ignored by the reference library without its CUDA extension); loaded as 1 "
            f"factor, as the file was trained, in {len(rebuilt)} layers (e.g. {rebuilt[0]!r})", PeftWarning,
            stacklevel=2)
    return state_dict


BOFT = register_method(
    MethodSpec(
        peft_type=PeftType.BOFT,
        prefix="boft_",
        config_cls=BOFTConfig,
        tuner_name="BOFTModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,
        identity_at_init=True,
        mergeable=True,
        # the tiny models' linear targets have 10 (custom MLP), 16 or 32 inputs; two blocks of 5 / 8 / 16 (smaller
        # blocks rotate too little for the suite's "a non-identity adapter changes the outputs" on tiny BERT)
        example_configs=(
            {"boft_block_size": 0, "boft_block_num": 2},
            {"boft_block_size": 0, "boft_block_num": 1, "boft_dropout": 0.1, "bias": "boft_only"},
        ),
        non_identity_kwargs={"init_weights": False},
        # nn.Conv2d is supported too (tests/test_boft.py); not listed because the suite's "conv" cases include an
        # nn.Conv1d model, which the reference's BOFT refuses
        supported_kinds=(LINEAR, QUANT_LINEAR),
        additive=False,
        layer_cls=BOFTLayer,
        convert_checkpoint=_convert_checkpoint,
        update_strength=_update_strength,
    )
)

__all__ = ["BOFT", "BOFTConfig", "BOFTLayer", "GroupedConvError"]
