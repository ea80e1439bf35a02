"""Tiny mixture-of-experts transformers models built from their configs: hidden 32, 2 layers, 4 experts, top-2
(Llama 4: top-1), vocabulary 64. ``moe_model(name)`` returns the same weights for the same name (seed 0)."""

from __future__ import annotations

from typing import Any

import torch
import transformers as T

COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 64, "intermediate_size": 48, "max_position_embeddings": 64}
_QWEN = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24}
_LOCAL = {"num_local_experts": 4, "num_experts_per_tok": 2}
#: routed experts, one shared expert and a dense first layer (DeepSeek-V2/V3, GLM4-MoE)
_SHARED = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "n_shared_experts": 1,
           "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
_DEEPSEEK = {**_SHARED, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
             "v_head_dim": 8}

#: model type -> (config class, model class, config fields besides :data:`COMMON`)
_BUILDERS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, _LOCAL),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, {**_QWEN, "head_dim": 8}),
    "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, {**_QWEN, "shared_expert_intermediate_size": 24}),
    "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM, {"num_experts": 4, "num_experts_per_tok": 2}),
    "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM, _DEEPSEEK),
    "deepseek_v2": (T.DeepseekV2Config, T.DeepseekV2ForCausalLM, _DEEPSEEK),
    "glm4_moe": (T.Glm4MoeConfig, T.Glm4MoeForCausalLM, {**_SHARED, "head_dim": 8}),
    "qwen3_next": (T.Qwen3NextConfig, T.Qwen3NextForCausalLM, {
        **_QWEN, "shared_expert_intermediate_size": 24, "head_dim": 8, "linear_num_value_heads": 2,
        "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
        "layer_types": ["linear_attention", "full_attention"]}),
    "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM,
                {**_LOCAL, "head_dim": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    "llama4": (T.Llama4TextConfig, T.Llama4ForCausalLM,
               {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 48, "head_dim": 8}),
    "phimoe": (T.PhimoeConfig, T.PhimoeForCausalLM, _LOCAL),
}


def moe_model(name: str) -> torch.nn.Module:
    """The tiny causal LM of model type ``name`` (a key of ``_BUILDERS``)."""
    config_cls, model_cls, fields = _BUILDERS[name]
    torch.manual_seed(0)
    return model_cls(config_cls(**COMMON, **fields))
