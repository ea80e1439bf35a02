"""Default ``target_modules`` per transformers ``model_type`` (data only)."""

from __future__ import annotations

_QV_PROJ = ("q_proj", "v_proj")

#: LoRA (and LoHa/LoKr) defaults: the reference's table, plus Whisper, which it lacks.
LORA_TARGETS: dict[str, tuple[str, ...] | str] = {
    **{m: ("q", "v") for m in ("t5", "mt5", "umt5")},
    **{m: _QV_PROJ for m in (
        "bart", "mbart", "marian", "pegasus", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral",
        "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "stablelm", "olmo", "olmo2",
        "granite", "phi3_small", "cohere", "starcoder2", "whisper", "m2m_100", "nllb_moe", "blenderbot",
        "blenderbot-small", "plbart", "xglm",
    )},
    **{m: ("query", "value") for m in (
        "bert", "roberta", "xlm-roberta", "electra", "layoutlm", "camembert", "ernie", "megatron-bert",
        "xlm-roberta-xl", "esm", "mobilebert", "rembert", "roc_bert",
    )},
    **{m: ("query_key_value",) for m in ("bloom", "gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel", "chatglm")},
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "distilbert": ("q_lin", "v_lin"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "mpt": ("Wqkv",),
    "codegen": ("qkv_proj",),
    "btlm": ("c_proj", "c_attn"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "phi3": ("qkv_proj",),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    # mixture-of-experts types the reference has no entry for (its MoE conversion also empties the defaults of
    # mixtral, qwen3_moe, olmoe, ...: it raises there); attention only, as for the dense models
    **{m: _QV_PROJ for m in ("olmoe", "glm4_moe", "qwen3_next", "gpt_oss", "phimoe", "minimax", "flex_olmo")},
    **{m: ("q_proj", "q_b_proj", "kv_b_proj") for m in ("deepseek_v2", "deepseek_v3")},
}


#: 🤗 PEFT's Mamba rule (``_check_lora_target_modules_mamba``): these model types' mixers hand the weights of
#: ``out_proj`` and ``conv1d`` to fused CUDA kernels, which bypass any adapter wrapped around them
MAMBA_MODEL_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
MAMBA_FUSED_MODULES = frozenset({"out_proj", "conv1d"})

#: ``model_type -> leaf module names`` whose weight the model reads directly on every device (transformers 5's
#: Mamba mixers compute ``dt_proj.weight @ x``): an adapter there is never used, so ``all-linear`` leaves them out
DIRECT_WEIGHT_MODULES: dict[str, frozenset[str]] = {
    m: frozenset({"dt_proj"}) for m in ("mamba", "falcon_mamba", "jamba")
}

#: ``nn.Linear`` subclasses (by class name) whose forward is not ``x @ W.T + b`` of shape ``(..., out_features)``,
#: with the reason: not linear layers for ``all-linear``, and an adapter layer cannot wrap them
NOT_LINEAR_CLASSES: dict[str, str] = {
    **dict.fromkeys(("Llama4Router", "PhimoeTopKRouter"),
                    "its forward returns a tuple (router scores, router logits), not a tensor"),
    "DeepseekV4GroupedLinear": "its forward is a block-diagonal grouped projection of shape (..., groups, out)",
}


def default_lora_targets(model_type: str | None) -> set[str] | str | None:
    """LoRA's default ``target_modules`` for ``model_type`` (a set, a regex str, or None when unknown)."""
    value = LORA_TARGETS.get(model_type or "")
    if value is None or isinstance(value, str):
        return value
    return set(value)


#: (IA)³ defaults: ``model_type -> (target_modules, feedforward_modules)``, the reference's table.
IA3_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{m: (("k_proj", "v_proj", "down_proj"), ("down_proj",)) for m in ("llama", "mistral")},
    **{m: (("q_proj", "v_proj", "down_proj"), ("down_proj",)) for m in (
        "llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
    )},
    "mixtral": (("k_proj", "v_proj", "w2"), ("w2",)),
    "t5": (("k", "v", "wo"), ("wo",)),
    "mt5": (("k", "v", "wi_1"), ()),
    **{m: (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)) for m in ("gpt2", "gpt_bigcode")},
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    **{m: (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)) for m in (
        "gpt_neox", "falcon", "RefinedWeb", "RefinedWebModel",
    )},
    "opt": (("q_proj", "k_proj", "fc2"), ("fc2",)),
    **{m: (("q_proj", "v_proj", "fc2"), ("fc2",)) for m in ("bart", "phi")},
    "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "gpt_neo": (("q_proj", "v_proj", "c_proj"), ("c_proj",)),
    **{m: (("key", "value", "output.dense"), ("output.dense",)) for m in ("bert", "roberta")},
    "deberta-v2": (("key_proj", "value_proj", "output.dense"), ("output.dense",)),
    "deberta": (("in_proj", "output.dense"), ("output.dense",)),
}


def default_ia3_targets(model_type: str | None) -> set[str] | None:
    """(IA)³'s default ``target_modules`` for ``model_type`` (None when unknown)."""
    entry = IA3_TARGETS.get(model_type or "")
    return None if entry is None else set(entry[0])


def default_ia3_feedforward(model_type: str | None) -> set[str] | None:
    """(IA)³'s default ``feedforward_modules`` for ``model_type`` (None when unknown)."""
    entry = IA3_TARGETS.get(model_type or "")
    return None if entry is None else set(entry[1])


#: AdaLoRA defaults: the reference's table (T5 lists ``wi``, as the reference does, even though T5 v1.1 has
#: ``wi_0`` / ``wi_1``).
ADALORA_TARGETS: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    **{m: ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2") for m in ("bart", "opt")},
    **{m: ("c_attn",) for m in ("gpt2", "gpt_bigcode")},
    **{m: ("query_key_value",) for m in ("bloom", "gpt_neox")},
    **{m: _QV_PROJ for m in (
        "gptj", "gpt_neo", "llama", "llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
    )},
    "bert": ("query", "value"),
    "roberta": ("query", "key", "value", "dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "deberta": ("in_proj",),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


def default_adalora_targets(model_type: str | None) -> set[str] | str | None:
    """AdaLoRA's default ``target_modules`` for ``model_type`` (a set, a regex str, or None when unknown)."""
    value = ADALORA_TARGETS.get(model_type or "")
    if value is None or isinstance(value, str):
        return value
    return set(value)
