"""Tiny mixture-of-experts (and related) transformers models built from their configs: hidden 32, 2 layers,
4 experts, top-2, vocabulary 64. ``moe_model(name)`` returns the same weights for the same name (seed 0)."""

from __future__ import annotations

import torch
import transformers as T

COMMON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 64, "intermediate_size": 48, "max_position_embeddings": 64}
DEEPSEEK = {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "n_shared_experts": 1,
            "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "q_lora_rank": 16, "kv_lora_rank": 16,
            "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8}


def moe_model(name: str) -> torch.nn.Module:
    """The tiny causal LM of model type ``name`` (see :data:`MOE_MODELS`)."""
    torch.manual_seed(0)
    if name == "mixtral":
        cfg = T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
        return T.MixtralForCausalLM(cfg)
    if name == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8)
        return T.Qwen3MoeForCausalLM(cfg)
    if name == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=24)
        return T.Qwen2MoeForCausalLM(cfg)
    if name == "olmoe":
        cfg = T.OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2)
        return T.OlmoeForCausalLM(cfg)
    if name in ("deepseek_v3", "deepseek_v2"):  # a dense first layer, then routed + shared experts
        config_cls, model_cls = ((T.DeepseekV3Config, T.DeepseekV3ForCausalLM) if name == "deepseek_v3"
                                 else (T.DeepseekV2Config, T.DeepseekV2ForCausalLM))
        return model_cls(config_cls(**COMMON, **DEEPSEEK))
    if name == "glm4_moe":
        cfg = T.Glm4MoeConfig(**COMMON, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                              n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=8)
        return T.Glm4MoeForCausalLM(cfg)
    if name == "qwen3_next":
        cfg = T.Qwen3NextConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                shared_expert_intermediate_size=24, head_dim=8,
                                linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                                layer_types=["linear_attention", "full_attention"])
        return T.Qwen3NextForCausalLM(cfg)
    if name == "gpt_oss":
        cfg = T.GptOssConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["sliding_attention","full_attention"])
        return T.GptOssForCausalLM(cfg)
    if name == "llama4":
        cfg = T.Llama4TextConfig(**COMMON, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=48, head_dim=8)
        return T.Llama4ForCausalLM(cfg)
    if name == "phimoe":
        cfg = T.PhimoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
        return T.PhimoeForCausalLM(cfg)
    if name == "mamba":
        cfg = T.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=8)
        return T.MambaForCausalLM(cfg)
    if name == "mamba2":
        cfg = T.Mamba2Config(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=8, num_heads=4, head_dim=16, n_groups=1, expand=2)
        return T.Mamba2ForCausalLM(cfg)
    if name == "falcon_h1":
        cfg = T.FalconH1Config(**COMMON, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16, head_dim=8)
        return T.FalconH1ForCausalLM(cfg)
    raise KeyError(name)


#: the MoE model types whose experts transformers stores as 3-D parameters (all but Llama 4 reach the routed path)
MOE_MODELS = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "deepseek_v2", "glm4_moe", "qwen3_next",
              "gpt_oss", "phimoe", "llama4")
