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
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
}


def default_lora_targets(model_type: str | None) -> set[str] | str | None:
    """LoRA's default ``target_modules`` for ``model_type`` (a set, a regex str, or None when unknown)."""
    value = LORA_TARGETS.get(model_type or "")
    if value is None or isinstance(value, str):
        return value
    return set(value)
