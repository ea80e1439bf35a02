"""VB-LoRA (LoRA factors from a shared vector bank): registration of the method with the registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...registry import MethodSpec, register_method
from ...types import PeftType
from .bank import index_dtype, logits_from_topk, topk_only, vblora_factors
from .config import VBLoRAConfig
from .layers import VBLORA_KINDS, VBLoRALayer, attach_shared_bank, create_layer, layer_options
from .tuner import VBLoRATunerMixin

#: the reference's ``TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING``
VBLORA_TARGETS: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"],
    "deberta": ["in_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}

_LOGITS = (".vblora_logits_A", ".vblora_logits_B")
_INDICES, _WEIGHTS = "_topk_indices", "_topk_weights"


def _default_targets(model_type: str | None) -> set[str] | str | None:
    value = VBLORA_TARGETS.get(model_type or "")
    return value if value is None or isinstance(value, str) else set(value)


def _export_state(model: nn.Module, config: PeftConfig, adapter_name: str, tensors: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """``save_only_topk_weights``: each ``<path>.vblora_logits_X`` is saved as ``<path>.vblora_logits_X_topk_indices``
    (``(..., topk)``, the smallest int dtype for ``num_vectors``) and ``..._topk_weights`` (``(..., topk - 1)``),
    as the reference does."""
    assert isinstance(config, VBLoRAConfig)
    if not config.save_only_topk_weights:
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(_LOGITS):
            out[key + _INDICES], out[key + _WEIGHTS] = topk_only(value, config.topk, index_dtype(config.num_vectors))
        else:
            out[key] = value
    return out


def _convert_checkpoint(model: nn.Module, checkpoint: dict[str, torch.Tensor], adapter_name: str
                        ) -> dict[str, torch.Tensor]:
    """Restore logits from a ``save_only_topk_weights`` file: ``log(weight)`` at the saved indices, ``-inf``
    elsewhere (loads for inference and merging; training such an adapter raises, as the reference)."""
    if not any(key.endswith(_INDICES) for key in checkpoint):
        return checkpoint
    config = model.peft_config[adapter_name]  # type: ignore[index]
    out: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        if key.endswith(_INDICES):
            stem = key.removesuffix(_INDICES)
            out[stem] = logits_from_topk(value, checkpoint[stem + _WEIGHTS], config.num_vectors)
        elif not key.endswith(_WEIGHTS):
            out[key] = value
    return out


def _update_strength(params: dict[str, torch.Tensor], config: dict[str, Any]
                     ) -> tuple[list[int], int | None, float, None]:
    """For ``peftkit inspect``: ``([out, in], r, ‖B A‖_F, None)`` of one layer from its saved logits (or top-k
    indices and weights) and the model's bank (``vblora_vector_bank``, passed beside every layer's tensors)."""
    bank = params["vblora_vector_bank"].double()
    topk, num_vectors = int(config.get("topk", 2)), bank.shape[0]
    logits = []
    for name in ("vblora_logits_A", "vblora_logits_B"):
        if name in params:
            logits.append(params[name].double())
        else:
            logits.append(logits_from_topk(params[name + _INDICES], params[name + _WEIGHTS], num_vectors).double())
    A, B = vblora_factors(logits[0], logits[1], bank, topk)
    return [B.shape[0], A.shape[1]], A.shape[0], float((B @ A).norm()), None


VBLORA = register_method(
    MethodSpec(
        peft_type=PeftType.VBLORA,
        prefix="vblora_",
        config_cls=VBLoRAConfig,
        tuner_name="VBLoRAModel",
        create_layer=create_layer,
        layer_options=layer_options,
        default_targets=_default_targets,
        identity_at_init=False,  # bank and logits are random: B A != 0 from the start, as in the reference
        mergeable=True,
        example_configs=(
            # a larger bank than the default 0.02 so that the (never identity) update is visible in tiny models
            {"r": 2, "num_vectors": 8, "vector_length": 2, "init_vector_bank_bound": 0.5},
            {"r": 3, "num_vectors": 16, "vector_length": 2, "topk": 3, "vblora_dropout": 0.1,
             "init_vector_bank_bound": 0.5, "init_logits_std": 1.0},
        ),
        supported_kinds=VBLORA_KINDS,
        layer_cls=VBLoRALayer,
        export_state=_export_state,
        convert_checkpoint=_convert_checkpoint,
        shared_state=attach_shared_bank,
        tuner_mixin=VBLoRATunerMixin,
        update_strength=_update_strength,
    )
)

__all__ = ["VBLORA", "VBLORA_TARGETS", "VBLoRAConfig", "VBLoRALayer", "vblora_factors"]
