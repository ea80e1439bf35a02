"""PSOFT (orthogonal fine-tuning in the principal subspace): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch

from ...layers.dispatch import LINEAR
from ...registry import MethodSpec, register_method
from ...target_tables import default_lora_targets
from ...types import PeftType
from .config import PsoftConfig
from .layers import OrthTransform, PsoftLayer, cayley, cayley_neumann, create_layer, layer_options


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([r, r], r, ‖R − I‖_F, None)`` from the saved ``psoft_R`` tensors alone (``ΔW =
    B (R − I) A`` also needs the base weight's SVD, which is not in the file)."""
    weight = params["psoft_R"].double()
    if config.get("psoft_orth", True):
        r = int((1 + (1 + 8 * weight.numel()) ** 0.5) / 2)  # weight: (r(r-1)/2,)
        rows, cols = torch.triu_indices(r, r, 1)
        Q = torch.zeros(r, r, dtype=torch.float64).index_put((rows, cols), weight)
        Q = Q - Q.t()
        R = (cayley_neumann(Q, int(config.get("num_cayley_neumann_terms", 5)), config.get("cayley_neumann_eps"))
             if config.get("use_cayley_neumann") else cayley(Q))
    else:
        R, r = weight, weight.shape[0]
    if "psoft_R.vector_b" in params:
        R = params["psoft_R.vector_b"].double()[:, None] * R
    if "psoft_R.vector_a" in params:
        R = R * params["psoft_R.vector_a"].double()[None, :]
    return [r, r], r, float((R - torch.eye(r, dtype=torch.float64)).norm()), None

PSOFT = register_method(
    MethodSpec(
        peft_type=PeftType.PSOFT,
        prefix="psoft_",
        config_cls=PsoftConfig,
        tuner_name="PsoftModel",
        create_layer=create_layer,
        layer_options=layer_options,
        default_targets=default_lora_targets,  # the reference's PSOFT table is a copy of LoRA's
        identity_at_init=True,
        mergeable=True,
        example_configs=(
            {"r": 4},
            {"r": 4, "ab_svd_init": "pissa_init", "use_cayley_neumann": True, "psoft_mag_a": False,
             "psoft_dropout": 0.1},
        ),
        non_identity_kwargs={"init_weights": False},  # larger draws than the reference: see OrthTransform
        supported_kinds=(LINEAR,),
        layer_cls=PsoftLayer,
        update_strength=_update_strength,
    )
)

__all__ = ["PSOFT", "OrthTransform", "PsoftConfig", "PsoftLayer"]
