"""OSF (orthogonal subspace fine-tuning): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch

from ...layers.dispatch import LINEAR
from ...registry import MethodSpec, register_method
from ...types import PeftType
from .config import OSFConfig
from .layers import OSFLayer, create_layer, layer_options
from .utils import decompose_weight_matrix, project_gradient_to_orthogonal_space

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
#: the reference's ``TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING``
OSF_TARGETS: dict[str, tuple[str, ...]] = {
    **{m: _LLAMA_LIKE for m in ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2",
                                "qwen3", "phi")},
    "gpt2": ("c_attn", "c_proj"),
    "bloom": ("query_key_value", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
    "gpt_bigcode": ("c_attn", "c_proj"),
}


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, float | None]:
    """For ``peftkit inspect``: ``([out, in], l, ‖U_low diag(S_low) V_low‖_F, None)``: the size of the trained low
    part (its initial value, and so ``ΔW``, needs the base weight, which is not in the file)."""
    U = params["osf_svd_params.U_low"].double()
    S = params["osf_svd_params.S_low"].double()
    V = params["osf_svd_params.V_low"].double()
    US = U * S[None, :]  # (out, l)
    norm_sq = torch.trace((US.t() @ US) @ (V @ V.t()))  # ‖US V‖_F² through (l, l) matrices
    return [U.shape[0], V.shape[1]], S.numel(), float(norm_sq.clamp_min(0).sqrt()), None


def default_osf_targets(model_type: str | None) -> set[str] | str:
    """The table's targets for ``model_type``; ``"all-linear"`` for other models (as the reference's OSF)."""
    targets = OSF_TARGETS.get(model_type or "")
    return set(targets) if targets is not None else "all-linear"


OSF = register_method(
    MethodSpec(
        peft_type=PeftType.OSF,
        prefix="osf_",
        config_cls=OSFConfig,
        tuner_name="OSFModel",
        create_layer=create_layer,
        layer_options=layer_options,
        default_targets=default_osf_targets,
        identity_at_init=True,
        mergeable=True,
        example_configs=({"effective_rank": 2}, {"effective_rank": 0.5, "rank_pattern": {"v": 3}}),
        non_identity_kwargs={"init_weights": False},
        supported_kinds=(LINEAR,),
        rank_field="effective_rank",
        pattern_fields=(),  # rank_pattern keys are re.search patterns here, not LoRA's name-suffix rule
        layer_cls=OSFLayer,
        update_strength=_update_strength,
    )
)

__all__ = ["OSF", "OSFConfig", "OSFLayer", "decompose_weight_matrix", "project_gradient_to_orthogonal_space"]
