"""HiRA (Hadamard high-rank adaptation): registration of the method with the registry."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import PeftWarning, UnsupportedModuleError
from ...injection.match import pattern_value
from ...layers.dispatch import CONV, EMBEDDING, HF_CONV1D, LINEAR, QUANT_LINEAR, require_kind
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import HiraConfig
from .layers import HiraLayer

#: the module kinds HiRA wraps (the reference: nn.Linear, bitsandbytes 8-bit / 4-bit linears, transformers'
#: ``Conv1D``, nn.Embedding, nn.Conv1d / Conv2d / Conv3d with ``groups=1``)
HIRA_KINDS = (LINEAR, QUANT_LINEAR, HF_CONV1D, EMBEDDING, CONV)


class HiraGroupedConvError(UnsupportedModuleError, NotImplementedError):
    """A grouped convolution (``groups > 1``) targeted: ``W0 ⊙ (B A)`` needs ``B A`` in the grouped kernel's shape
    ``(out, in / groups, *k)``, which the factors do not have (the reference raises ``NotImplementedError``)."""


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the kind and the rank after ``rank_pattern``. Raises for modules HiRA cannot wrap."""
    assert isinstance(config, HiraConfig)
    kind = require_kind(name, module, HIRA_KINDS, "HiRA")
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if kind == CONV and base.groups > 1:
        raise HiraGroupedConvError(
            f"HiRA does not support grouped convolutions: target module {name!r} has groups={base.groups}"
        )
    return {"kind": kind, "r": pattern_value(config.rank_pattern or {}, name, config.r)}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> HiraLayer:
    assert isinstance(config, HiraConfig)
    kind = options["kind"]
    if config.fan_in_fan_out and kind in (LINEAR, QUANT_LINEAR):
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                      "Setting fan_in_fan_out to False.", PeftWarning, stacklevel=3)
    # Conv1D: fan_in_fan_out is a fact of the module (the layer reads it), not a setting to warn about
    layer = module if isinstance(module, HiraLayer) else HiraLayer(module, kind)
    layer.update_layer(adapter_name, options["r"], config.init_weights, float(config.hira_dropout), dtype=dtype)
    return layer


def _convert_checkpoint(model: nn.Module, checkpoint: dict[str, torch.Tensor], adapter_name: str
                        ) -> dict[str, torch.Tensor]:
    """Load a file written by the reference with a ``rank_pattern``: the reference ignores that field when it wraps
    a module, so its files hold rank ``config.r`` everywhere. Layers whose rank came from ``rank_pattern`` and whose
    tensors in the file have rank ``config.r`` are resized to it, with a warning; any other difference stays a shape
    mismatch. The checkpoint is returned unchanged."""
    config = model.peft_config[adapter_name]  # type: ignore[index]
    if not config.rank_pattern:
        return checkpoint
    ranks = {key.rsplit(".", 1)[0]: value.shape[0] for key, value in checkpoint.items()
             if key.endswith((".hira_A", ".hira_embedding_A")) and value.shape[0] == config.r}
    resized = []
    for name, layer in model.named_modules():
        if not isinstance(layer, HiraLayer) or adapter_name not in layer.r:
            continue
        short = name.removeprefix("base_model.model.")
        rank = next((r for key, r in ranks.items() if key == short or key.endswith("." + short)), None)
        if rank is not None and rank != layer.r[adapter_name]:
            layer.resize_adapter(adapter_name, int(rank))
            resized.append(f"{short}: {rank}")
    if resized:
        warnings.warn(f"the file's HiRA ranks differ from the config's r / rank_pattern (the reference ignores "
                      f"rank_pattern); loaded with the file's ranks: {', '.join(resized[:5])}", PeftWarning,
                      stacklevel=3)
    return checkpoint


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``(shape of B A, r, ‖B A‖_F, None)``. The update is ``W0 ⊙ (B A)`` and ``W0`` is not
    in the file, so the multiplicative factor's norm is what a file alone can tell."""
    a = params.get("hira_A", params.get("hira_embedding_A"))
    b = params.get("hira_B", params.get("hira_embedding_B"))
    product = b.double().flatten(1) @ a.double().flatten(1)
    return list(product.shape), int(a.shape[0]), float(product.norm()), None


HIRA = register_method(
    MethodSpec(
        peft_type=PeftType.HIRA,
        prefix="hira_",
        config_cls=HiraConfig,
        tuner_name="HiraModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,  # the reference's table is a copy of LoRA's
        identity_at_init=True,
        mergeable=True,
        example_configs=({"r": 4}, {"r": 2, "init_weights": "gaussian", "hira_dropout": 0.1}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=HIRA_KINDS,
        # not mixed_compatible: the reference's PeftMixedModel refuses HiRA (not in its COMPATIBLE_TUNER_TYPES,
        # although it registers HiRA with is_mixed_compatible=True)
        layer_cls=HiraLayer,
        update_strength=_update_strength,
        pattern_fields=("rank_pattern",),
        convert_checkpoint=_convert_checkpoint,
    )
)

__all__ = ["HIRA", "HiraConfig", "HiraGroupedConvError", "HiraLayer"]
