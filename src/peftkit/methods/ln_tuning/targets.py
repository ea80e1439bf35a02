"""LN tuning's default ``target_modules`` per transformers ``model_type`` (the reference's table; data only)."""

from __future__ import annotations

_LLAMA_LIKE = ("input_layernorm", "post_attention_layernorm", "norm")
_GEMMA2_LIKE = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm", "norm")

#: ``TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING`` of the reference
LN_TUNING_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LIKE,
    "bloom": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "llava": ("multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"),
    "t5": ("layer_norm", "final_layer_norm"),
    "mt5": ("layer_norm", "final_layer_norm"),
    "bart": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
    "gpt2": ("ln_1", "ln_2", "ln_f"),
    "blip-2": ("layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"),
    "gptj": ("ln_1", "ln_f"),
    "falcon": ("input_layernorm", "post_attention_layernorm", "ln_f"),
    "mistral": _LLAMA_LIKE,
    "phi": ("input_layernorm", "final_layernorm"),
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "qwen2": ("post_attention_layernorm",),
    "qwen3": ("post_attention_layernorm",),
}


def default_ln_tuning_targets(model_type: str | None) -> set[str] | None:
    """LN tuning's default ``target_modules`` for ``model_type`` (None when unknown)."""
    value = LN_TUNING_TARGETS.get(model_type or "")
    return None if value is None else set(value)
