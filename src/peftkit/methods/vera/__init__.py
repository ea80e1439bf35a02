"""VeRA (vector-based random matrix adaptation): registration of the method with the registry.

The shared projections live in one :class:`VeraProjections` per model, bound to every VeRA layer after the layers
of an adapter are created (``extra_layers``: it is the first step that sees the whole model, so the projections are
sized by the largest adapted layer, as the reference's ``_find_dim``). Checkpoints store them once, under the
reference's keys ``base_model.vera_A`` / ``base_model.vera_B`` (``export_state`` / ``convert_checkpoint``), or not
at all with ``save_projection=False`` (then the seed regenerates them bit-exactly).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import (
    AdapterConflictError,
    AdapterLoadError,
    PeftWarning,
    ShapeMismatchError,
)
from ...layers.dispatch import HF_CONV1D, LINEAR, require_kind
from ...module_utils import walk_modules
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import VeraConfig
from .layers import VeraLayer, VeraProjections

#: the module kinds VeRA wraps (the reference: ``nn.Linear`` and transformers' ``Conv1D``)
VERA_KINDS = (LINEAR, HF_CONV1D)
#: checkpoint names of the shared projections (after the tuner's prefix, ``base_model.``)
PROJECTION_KEYS = ("vera_A", "vera_B")


class VeraProjectionMismatchError(AdapterConflictError, ShapeMismatchError):
    """A further VeRA adapter does not fit the model's shared projections (another ``r``, or larger layers than the
    first adapter's): a conflict with the adapters present and a shape mismatch (of ``vera_A`` / ``vera_B``); a
    ``ValueError``, which the reference raises."""


@dataclass(frozen=True)
class SharedProjectionSpec:
    """What the shared-projection hooks of this module need to know about a VeRA-like method (VeRA; PVeRA reuses
    them): its name in messages, config and layer classes, how to draw the projections for a config
    (``(config, max_in, max_out, device) -> VeraProjections``) and their checkpoint names (attributes of the
    projections object)."""

    label: str
    config_cls: type[PeftConfig]
    layer_cls: type[nn.Module]
    make_projections: Callable[[Any, int, int, torch.device], VeraProjections]
    keys: tuple[str, str]


VERA_SHARED = SharedProjectionSpec(
    "VeRA", VeraConfig, VeraLayer,
    lambda c, i, o, d: VeraProjections(c.projection_prng_key, c.r, i, o, c.save_projection, device=d),
    PROJECTION_KEYS)


def default_vera_targets(model_type: str | None) -> set[str] | str | None:
    """The reference's table: LoRA's, except ``phi`` (``q_proj``, ``v_proj``)."""
    if model_type == "phi":
        return {"q_proj", "v_proj"}
    return default_lora_targets(model_type)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the layer kind and ``fan_in_fan_out`` (detected: True exactly for ``Conv1D``)."""
    kind = require_kind(name, module, VERA_KINDS, "VeRA")
    return {"kind": kind, "fan_in_fan_out": kind == HF_CONV1D}


def _create_layer(
    module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str, dtype: torch.dtype
) -> VeraLayer:
    assert isinstance(config, VeraConfig)
    layer = module if isinstance(module, VeraLayer) else VeraLayer(module, options["fan_in_fan_out"])
    layer.update_layer(adapter_name, config.r, config.vera_dropout, config.init_weights, config.d_initial,
                       dtype=dtype)
    return layer


def _vera_layers(model: nn.Module, layer_cls: type[nn.Module] = VeraLayer) -> list[Any]:
    return [m for _, m in walk_modules(model) if isinstance(m, layer_cls)]


def _bind_projections(model: nn.Module, config: PeftConfig, adapter_name: str, applied: Any,
                      autocast_adapter_dtype: bool, method: SharedProjectionSpec = VERA_SHARED) -> None:
    """Give every layer of ``adapter_name`` the model's shared projections: the existing ones (checked against
    ``config``: same seed, ``save_projection`` and ``r``, large enough for the new layers), or new ones sized
    ``(r, largest in)`` / ``(largest out, r)`` over the new adapter's layers."""
    assert isinstance(config, method.config_cls)
    layers = _vera_layers(model, method.layer_cls)
    mine = [layer for layer in layers if layer.has_adapter(adapter_name)]
    # the projections of the adapters still present (a layer whose adapters were all deleted keeps a stale one)
    shared = next((layer.vera_projections for layer in layers if layer.vera_projections is not None
                   and any(name != adapter_name for name in layer.adapter_names())), None)
    if shared is None:
        device = mine[0].get_base_layer().weight.device
        shared = method.make_projections(config, max(m.in_features for m in mine),
                                         max(m.out_features for m in mine), device)
    else:
        _check_compatible(shared, config, mine, method.label)
    for layer in mine:
        layer.vera_projections = shared


def _check_compatible(shared: VeraProjections, config: Any, layers: list[Any], label: str = "VeRA") -> None:
    """The reference's rules for a further adapter: the projections are shared, so its seed, ``save_projection``
    and ``r`` must be the first adapter's and its layers must fit in them. (The reference accepts a smaller ``r``
    and then fails in forward; this refuses it here.)"""
    for name, mine, theirs in (("projection_prng_key", config.projection_prng_key, shared.seed),
                               ("save_projection", config.save_projection, shared.save_projection),
                               ("r", config.r, shared.r)):
        if mine != theirs:
            error = VeraProjectionMismatchError if name == "r" else AdapterConflictError
            raise error(
                f"{name}={mine!r} differs from the {label} adapters already in the model ({name}={theirs!r}; size "
                f"mismatch of the shared projections for r); all {label} adapters of a model share one pair of "
                f"projections and must use the same {name}")
    too_big = [(m.in_features, m.out_features) for m in layers
               if m.in_features > shared.max_in or m.out_features > shared.max_out]
    if too_big:
        raise VeraProjectionMismatchError(
            f"size mismatch: layers of shape (in, out) {too_big[:3]} do not fit the shared projections (in <= {shared.max_in}, "
            f"out <= {shared.max_out}) made for the first {label} adapter; add the adapter with the largest layers "
            "first")


def _shared_of(model: nn.Module, adapter_name: str, layer_cls: type[nn.Module] = VeraLayer) -> VeraProjections:
    for layer in _vera_layers(model, layer_cls):
        if layer.has_adapter(adapter_name) and layer.vera_projections is not None:
            return layer.vera_projections
    raise AdapterLoadError(f"no {layer_cls.__name__} of the model holds adapter {adapter_name!r}")


def _prefix(keys: Any) -> str:
    """``"base_model."`` when the checkpoint keys are a ``PeftModel``'s (``base_model.model.…``), else ``""``."""
    return "base_model." if any(str(k).startswith("base_model.model.") for k in keys) else ""


def _export_state(model: nn.Module, config: PeftConfig, adapter_name: str, tensors: dict[str, torch.Tensor],
                  method: SharedProjectionSpec = VERA_SHARED) -> dict[str, torch.Tensor]:
    """Add the shared projections once, as the reference saves them (``base_model.vera_A`` / ``vera_B``), when
    ``save_projection``."""
    assert isinstance(config, method.config_cls)
    if not config.save_projection:
        return tensors
    shared = _shared_of(model, adapter_name, method.layer_cls)
    prefix = _prefix(tensors)
    return {**tensors, **{prefix + key: getattr(shared, key).detach() for key in method.keys}}


def _convert_checkpoint(model: nn.Module, checkpoint: dict[str, torch.Tensor], adapter_name: str,
                        method: SharedProjectionSpec = VERA_SHARED) -> dict[str, torch.Tensor]:
    """Take the shared projections out of ``checkpoint`` and copy them into the model's (shapes checked); the rest
    loads as usual. ``save_projection=True`` without them in the file is an error (as the reference); with
    ``save_projection=False`` projections found in the file are ignored with a warning (as the reference: the seed
    regenerates them)."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    found = {name: key for key in checkpoint for name in method.keys
             if key.removeprefix("base_model.model.").removeprefix("base_model.") == name}
    rest = {k: v for k, v in checkpoint.items() if k not in found.values()}
    if not isinstance(config, method.config_cls):
        return checkpoint
    if not config.save_projection:
        if found:
            warnings.warn(f"save_projection=False but the checkpoint holds {' / '.join(found)}; they are ignored and the "
                          "projections regenerated from projection_prng_key", PeftWarning, stacklevel=4)
        return rest
    if len(found) < len(PROJECTION_KEYS):
        raise AdapterLoadError(
            f"save_projection=True but the checkpoint of adapter {adapter_name!r} lacks "
            f"{sorted(set(method.keys) - set(found))}; "
            "set save_projection=False in adapter_config.json to regenerate them from projection_prng_key")
    shared = _shared_of(model, adapter_name, method.layer_cls)
    for name, key in found.items():
        target, value = getattr(shared, name), checkpoint[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ShapeMismatchError(f"size mismatch for {key}: checkpoint {tuple(value.shape)} vs model "
                                     f"{tuple(target.shape)} (r / target_modules differ from the saved adapter's)")
        with torch.no_grad():
            target.copy_(value)
    return rest


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([out, r], r, strength, None)`` of one layer from its saved vectors alone (the
    file does not say the layer's ``in``). ``strength`` is the expected ``‖ΔW‖_F`` over the random projections for a
    layer as wide as the widest adapted one: ``E[A_ki²] = 2 / max_in`` and ``E[B_ok²] = 2 / r`` (kaiming uniform),
    so ``E‖diag(λ_b) B diag(λ_d) A‖_F² = ‖λ_b‖² ‖λ_d‖² · 4 / r`` (times ``in / max_in`` for narrower layers)."""
    lambda_b, lambda_d = params["vera_lambda_b"].double(), params["vera_lambda_d"].double()
    r = lambda_d.numel()
    strength = float(lambda_b.norm() * lambda_d.norm() * 2.0 / math.sqrt(r))
    return [lambda_b.numel(), r], r, strength, None


VERA = register_method(
    MethodSpec(
        peft_type=PeftType.VERA,
        prefix="vera_lambda_",
        config_cls=VeraConfig,
        tuner_name="VeraModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_vera_targets,
        identity_at_init=True,
        mergeable=True,
        example_configs=({"r": 4}, {"r": 8, "d_initial": 0.5, "save_projection": False}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=VERA_KINDS,
        layer_cls=VeraLayer,
        extra_layers=_bind_projections,
        export_state=_export_state,
        convert_checkpoint=_convert_checkpoint,
        pattern_fields=(),
        update_strength=_update_strength,
    )
)

__all__ = ["VERA", "VERA_SHARED", "SharedProjectionSpec", "VeraConfig", "VeraLayer", "VeraProjectionMismatchError", "VeraProjections"]
