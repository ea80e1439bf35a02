"""TinyLoRA (a tiny trained vector through frozen SVD factors and random projections): registration of the method."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from ...errors import AdapterLoadError, PeftWarning, ShapeMismatchError
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import TinyLoraConfig
from .layers import (
    TINYLORA_KINDS,
    TinyLoraLayer,
    TinyLoraVectors,
    attach_vectors,
    create_layer,
    layer_options,
    plan_options,
)

_P_SUFFIX = ".tinylora_P"
#: a saved vector's key: ``[base_model.]tinylora_v.<group>``
_V_KEY = re.compile(r"^(?:base_model\.)?tinylora_v\.(\d+)$")


def _vectors_of(model: nn.Module, adapter_name: str) -> nn.ParameterDict:
    """Adapter ``adapter_name``'s vectors ``{group: v}`` (the tuner's ``tinylora_v[adapter_name]``)."""
    for module in model.modules():
        if isinstance(module, TinyLoraLayer) and module.has_adapter(adapter_name):
            vectors = module.tinylora_v
            if vectors is not None and adapter_name in vectors:
                return vectors[adapter_name]
    raise AdapterLoadError(f"no TinyLoRA layer of the model holds adapter {adapter_name!r}")


def _export_state(model: nn.Module, config: Any, adapter_name: str,
                  tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the adapter's vectors once each, without the adapter name, as the reference saves them:
    ``base_model.tinylora_v.<group>`` (``tinylora_v.<group>`` when the keys are the tuner's own)."""
    prefix = "base_model." if any(k.startswith("base_model.model.") for k in tensors) else ""
    vectors = _vectors_of(model, adapter_name)
    return {**tensors, **{f"{prefix}tinylora_v.{group}": v.detach() for group, v in vectors.items()}}


def _load_vectors(model: nn.Module, checkpoint: dict[str, torch.Tensor], adapter_name: str
                  ) -> dict[str, torch.Tensor]:
    """Copy the saved ``tinylora_v.<group>`` into the model's vectors (every group must be there, with the model's
    shape) and return the rest of ``checkpoint``."""
    found = {m.group(1): key for key in checkpoint if (m := _V_KEY.match(key))}
    vectors = _vectors_of(model, adapter_name)
    if set(found) != set(vectors.keys()):
        raise AdapterLoadError(
            f"the checkpoint of adapter {adapter_name!r} holds tinylora_v groups {sorted(found, key=int)} but the "
            f"model's adapter has groups {sorted(vectors.keys(), key=int)} (target_modules / weight_tying differ "
            "from the saved adapter's)")
    with torch.no_grad():
        for group, key in found.items():
            value, target = checkpoint[key], vectors[group]
            if tuple(value.shape) != tuple(target.shape):
                raise ShapeMismatchError(f"size mismatch for {key}: checkpoint {tuple(value.shape)} vs model "
                                         f"{tuple(target.shape)} (u differs from the saved adapter's)")
            target.copy_(value)
    return {k: v for k, v in checkpoint.items() if k not in found.values()}


def _convert_checkpoint(model: nn.Module, checkpoint: dict[str, torch.Tensor],
                        adapter_name: str) -> dict[str, torch.Tensor]:
    """Load the vectors (:func:`_load_vectors`), then the reference's ``save_projection`` rules: with ``save_projection=False`` projections found in the
    file are ignored (the seed regenerates them) with a warning; with True and none in the file, a warning that the
    seed regenerates them."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if not isinstance(config, TinyLoraConfig):
        return checkpoint
    checkpoint = _load_vectors(model, checkpoint, adapter_name)
    found = [key for key in checkpoint if key.endswith(_P_SUFFIX)]
    if config.save_projection and not found:
        warnings.warn("save_projection=True but the checkpoint holds no tinylora_P; the projections are regenerated "
                      "from projection_seed", PeftWarning, stacklevel=4)
    if not config.save_projection and found:
        warnings.warn("save_projection=False but the checkpoint holds tinylora_P; they are ignored and the "
                      "projections regenerated from projection_seed", PeftWarning, stacklevel=4)
        return {k: v for k, v in checkpoint.items() if not k.endswith(_P_SUFFIX)}
    return checkpoint


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([out, in], r, strength, None)`` of one layer from its saved factors and the
    model's vectors (``tinylora_v.<group>``, passed beside every layer's tensors). The file does not say which group
    a layer is in, so ``strength`` is the largest ``‖B R(v_g) A‖_F`` over the groups (exact with one group, an upper
    bound otherwise); 0.0 without saved projections."""
    A, B = params["tinylora_A"].double(), params["tinylora_B"].double()
    r = A.shape[0]
    vectors = [t.double() for k, t in params.items() if k.startswith("tinylora_v")]
    strength = 0.0
    if vectors and "tinylora_P" in params:
        P = params["tinylora_P"].double().reshape(-1, r * r)
        strength = max(float((B @ (v @ P).reshape(r, r) @ A).norm()) for v in vectors)
    return [B.shape[0], A.shape[1]], r, strength, None


TINYLORA = register_method(
    MethodSpec(
        peft_type=PeftType.TINYLORA,
        prefix="tinylora_",
        config_cls=TinyLoraConfig,
        tuner_name="TinyLoraModel",
        create_layer=create_layer,
        layer_options=layer_options,
        plan_options=plan_options,
        default_targets=default_lora_targets,  # the reference's table is a copy of LoRA's
        identity_at_init=True,
        mergeable=True,
        example_configs=(
            {"r": 2, "u": 4},
            {"r": 3, "u": 8, "weight_tying": 0.5, "tinylora_dropout": 0.1, "save_projection": False},
        ),
        # v large enough that the rank-r update of the tiny models' small weights shows in their outputs
        non_identity_kwargs={"init_weights": "uniform", "init_v_bound": 5.0},
        supported_kinds=TINYLORA_KINDS,
        layer_cls=TinyLoraLayer,
        shared_state=attach_vectors,
        export_state=_export_state,
        convert_checkpoint=_convert_checkpoint,
        pattern_fields=(),
        update_strength=_update_strength,
    )
)

__all__ = ["TINYLORA", "TinyLoraConfig", "TinyLoraLayer", "TinyLoraVectors"]
