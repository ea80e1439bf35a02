"""GLoRA (generalised LoRA): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import UnsupportedModuleError
from ...layers.dispatch import LINEAR
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import GloraConfig
from .layers import GloraLayer

#: the module kinds GLoRA wraps (the reference: exactly ``torch.nn.Linear``)
GLORA_KINDS = (LINEAR,)


def _layer_options(name: str, module: nn.Module, config: PeftConfig) -> dict[str, Any]:
    """Per-layer facts: the kind. Raises for anything but a plain ``nn.Linear`` (as the reference)."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if type(base) is not nn.Linear:
        raise UnsupportedModuleError(
            f"target module {name!r} is a {type(base).__name__}; GLoRA supports plain torch.nn.Linear only. "
            "Adjust target_modules.")
    return {"kind": LINEAR}


def _create_layer(module: nn.Module, options: dict[str, Any], config: PeftConfig, adapter_name: str,
                  dtype: torch.dtype) -> GloraLayer:
    assert isinstance(config, GloraConfig)
    layer = module if isinstance(module, GloraLayer) else GloraLayer(module)
    layer.update_layer(adapter_name, config.r, config.config_A_B, config.config_C, config.config_D_E,
                       config.init_weights, dtype=dtype)
    return layer


def _support(params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """One saved support tensor as stored: ``Xd @ Xu``, the vector/scalar ``X`` or the ``zeros`` buffer (float64)."""
    if f"{name}.Xd" in params:
        return params[f"{name}.Xd"].double() @ params[f"{name}.Xu"].double()
    return params.get(f"{name}.X", params.get(f"{name}.zeros")).double()


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect`` (the saved tensors hold no ``W``, so ``W ⊙ A`` cannot be formed):
    ``([out, in], r, sqrt(‖A‖² + ‖B‖²), None)`` with ``A``, ``B`` broadcast to ``(out, in)``; ``in`` comes from
    ``C: (in, ·)``, ``out`` from the first of A, B, D, E that is not a scalar (0 when all are)."""
    inp = params["glora_C.Xd" if "glora_C.Xd" in params else
                 "glora_C.X" if "glora_C.X" in params else "glora_C.zeros"].shape[0]
    A, B = _support(params, "glora_A"), _support(params, "glora_B")
    sized = [t.shape[0] for t in (A, B, _support(params, "glora_D"), _support(params, "glora_E")) if t.numel() > 1]
    out = sized[0] if sized else 0
    # a vector / scalar is repeated uniformly over (out, in): its squared norm scales by the number of copies
    norm = sum(float(t.square().sum()) * max(out * inp, t.numel()) / t.numel() for t in (A, B)) ** 0.5
    rank = params["glora_A.Xd"].shape[1] if "glora_A.Xd" in params else None
    return [out, inp], rank, norm, None


GLORA = register_method(
    MethodSpec(
        peft_type=PeftType.GLORA,
        prefix="glora_",
        config_cls=GloraConfig,
        tuner_name="GloraModel",
        create_layer=_create_layer,
        layer_options=_layer_options,
        default_targets=default_lora_targets,  # the reference's table is a copy of LoRA's
        identity_at_init=True,
        mergeable=True,
        # config_D_E="none": the tiny models' q/v biases are zero, so D (which scales the bias) gets an exactly
        # zero gradient there (also in the reference) and the suite's "every adapter tensor moves" would fail;
        # D/E are covered by tests/test_glora.py on layers with non-zero biases
        example_configs=({"r": 4, "config_D_E": "none"},
                         {"r": 2, "config_A_B": "vector", "config_C": "vector", "config_D_E": "none",
                          "bias": "glora_only"}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=GLORA_KINDS,
        # not mixed_compatible: the reference's PeftMixedModel refuses GLoRA (not in its COMPATIBLE_TUNER_TYPES)
        layer_cls=GloraLayer,
        pattern_fields=(),
        update_strength=_update_strength,
    )
)

__all__ = ["GLORA", "GloraConfig", "GloraLayer"]
