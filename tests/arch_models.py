"""Tiny models of (almost) every transformers architecture, built from their config classes (no files, no network).

``ARCH_CASES`` lists one :class:`ArchCase` per transformers ``model_type`` in four families, taken from the
installed transformers' auto mappings:

- ``causal``: ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (decoder-only language models, ``task_type="CAUSAL_LM"``),
- ``seq2seq``: ``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES`` (``task_type="SEQ_2_SEQ_LM"``),
- ``encoder``: ``MODEL_FOR_MASKED_LM_MAPPING_NAMES`` with a sequence-classification head (``task_type="SEQ_CLS"``),
- ``vision``: ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES`` (no task type).

A model type in several mappings belongs to the first family of ``seq2seq, encoder, vision, causal`` that lists it
(BART is ``seq2seq``, BERT ``encoder``). Each config is built with ``config_class(**kwargs)`` where ``kwargs`` shrinks
every size field the default config has (:data:`SHRINK`: hidden 32, 2 layers, 4 heads, vocab 128, 4 experts, 32x32
images), plus :data:`OVERRIDES` for the types that need more. Types that cannot be built tiny offline are listed in
:data:`SKIP` with the reason. Weights are drawn from a fixed seed so two builds give identical models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 128
SEQ_LEN = 8
IMAGE = 32

#: generic shrinking: ``config field -> tiny value``, applied to every field the default config has
SHRINK: dict[str, Any] = {
    # widths
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "dim", "word_embed_proj_dim",
                     "embedding_size", "projection_dim"), 32),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner",
                     "hidden_dim", "ffn_hidden_size", "intermediate_size_mlp", "decoder_intermediate_size"), 64),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 24),
    # depth
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
                     "num_decoder_layers", "num_encoder_layers"), 2),
    # heads
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_heads", "decoder_num_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "multi_query_group_num", "num_kv_heads", "n_kv_heads"), 2),
    **dict.fromkeys(("head_dim", "d_kv", "attention_head_size", "kv_channels"), 8),
    # vocabulary and positions
    "vocab_size": VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions"), 64),
    # mixture of experts
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), 4),
    "num_experts_per_tok": 2,
    # vision
    "image_size": IMAGE,
    "patch_size": 4,
    "num_channels": 3,
}

#: fields of :data:`SHRINK` that are also set where the default config leaves them ``None`` ("derive it")
NULLABLE = ("head_dim", "vocab_size", "num_key_value_heads", "intermediate_size", "n_routed_experts",
            "num_experts_per_tok")

#: multi-head latent attention (DeepSeek-V2/V3 style): small ranks and head dims instead of ``head_dim``
_MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8}
_MOE_GROUPS = {"n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1}
_MAMBA2_HEADS = {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 8,
                 "mamba_chunk_size": 16}
_HYBRID_LINEAR = {"layer_types": ["linear_attention", "full_attention"], "linear_num_value_heads": 2,
                  "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8}

#: per-type config kwargs on top of :data:`SHRINK` (``None`` removes a shrunk key)
OVERRIDES: dict[str, dict[str, Any]] = {
    **{t: {**_MLA, "head_dim": None} for t in ("minicpm3",)},
    **{t: {**_MLA, **_MOE_GROUPS, "head_dim": None} for t in (
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "longcat_flash", "youtu", "axk1", "axk2")},
    "glm4_moe": {**_MOE_GROUPS},
    "dots1": {**_MOE_GROUPS},
    **{t: {"rotary_dim": 4} for t in ("codegen", "gptj")},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"head_dim": 16, "n_groups": 1, "state_size": 8, "chunk_size": 16},
    **{t: dict(_MAMBA2_HEADS) for t in ("bamba", "granitemoehybrid")},
    "falcon_h1": {"mamba_d_ssm": 64, **_MAMBA2_HEADS},
    **{t: dict(_HYBRID_LINEAR) for t in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "qwen4_exp_text")},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
              "mamba_dt_rank": 4, "mamba_d_state": 8},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 32, "attention_window_size": 16},
    "ernie4_5_moe": {"moe_k": 2, "moe_layer_end_index": 1},
    "esm": {"pad_token_id": 0, "mask_token_id": 3, "max_position_embeddings": 64},
    **{t: {"emb_dim": 32} for t in ("xlm", "flaubert")},
    "luke": {"entity_vocab_size": 16, "entity_emb_size": 16},
    "roc_bert": {"pronunciation_vocab_size": 16, "pronunciation_embed_dim": 8, "shape_vocab_size": 16,
                 "shape_embed_dim": 8},
    **{t: {"window_size": 2} for t in ("swin", "donut-swin", "swinv2")},
    **{t: {"num_stages": 2} for t in ("convnext", "convnextv2")},
}

_NO_TINY = "no tiny config found that builds and runs offline"
_MULTIMODAL = ("multimodal: text-only inputs do not reach its vision/audio tower, whose adapters then get no "
               "gradient (covered by the text model type where transformers has one)")

#: model types left out, with the reason (decided at collection, never a runtime skip)
SKIP: dict[str, str] = {
    # need a package that is not installed
    "dinat": "needs the natten package",
    "timm_wrapper": "needs the timm package",
    # sizes tied together in ways the generic shrinking does not follow (transformers validation or shape errors)
    **dict.fromkeys((
        "nemo_speechlm", "vibevoice_asr", "esmc", "reformer", "bit", "cvt", "efficientnet", "hgnet_v2", "hiera",
        "levit", "mobilevit", "mobilevitv2", "poolformer", "pvt", "pvt_v2", "segformer", "siglip2", "swiftformer",
        "textnet", "axk2", "blt", "cohere_compass_text", "dbrx", "deepseek_v32", "dots3_note", "dots3_note_text",
        "emu3", "gemma3n", "gemma3n_text", "gemma4", "gemma4_assistant", "gemma4_text", "gemma4_unified",
        "gemma4_unified_assistant", "gemma4_unified_text", "glm_moe_dsa", "kimi_linear", "lfm2_moe", "llama4",
        "longcat_flash", "musicgen", "musicgen_melody", "qwen3_5", "qwen3_5_moe", "qwen4_exp", "qwen4_exp_text",
        "zamba", "zamba2", "zaya",
    ), _NO_TINY),
    # inputs other than token ids / pixels
    "voxtral_realtime": "needs audio input_features",
    "imagegpt": "an image model over token ids (input_ids), not pixel_values",
    "shieldgemma2": "needs input_ids and pixel_values together",
    "xmod": "needs a language id per input (set_default_language)",
    "mra": "its attention needs a CUDA kernel: on CPU query/key/value get no gradient",
    "perceiver": "the smallest config still builds a 270M-parameter model (fixed image/text preprocessors): ~15 s",
    **dict.fromkeys((
        "audioflamingo3", "glmasr", "granite_speech", "granite_speech_plus", "moss_transcribe_diarize",
        "musicflamingo", "qwen2_audio", "qwen3_asr", "t5gemma2", "voxtral", "modernvbert", "ultravbert", "gemma3",
        "git", "got_ocr2", "fuyu", "phi4_multimodal",
    ), _MULTIMODAL),
}


@dataclass(frozen=True)
class ArchCase:
    """One tiny architecture: its ``model_type``, family, model class name and peftkit/reference ``task_type``."""

    model_type: str
    family: str
    class_name: str
    task_type: str | None

    def __repr__(self) -> str:
        return self.model_type

    def config(self) -> Any:
        from transformers import CONFIG_MAPPING

        return tiny_config(CONFIG_MAPPING[self.model_type], self.model_type)

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh fp32 model in eval mode; the same ``seed`` gives bitwise-identical weights."""
        import transformers

        cls = getattr(transformers, self.class_name)
        config = self.config()
        if self.family == "encoder" or self.family == "vision":
            config.num_labels = 3
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
            with torch.no_grad():  # some models zero-init parts (e.g. gates); make every weight informative
                for p in model.parameters():
                    if p.dtype.is_floating_point:
                        p.normal_(0.0, 0.05)
        return model.float().eval()

    def inputs(self, batch_size: int = 2) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        if self.family == "vision":
            return {"pixel_values": torch.randn(batch_size, 3, IMAGE, IMAGE, generator=g)}
        ids = torch.randint(3, VOCAB, (batch_size, SEQ_LEN), generator=g)
        inputs: dict[str, Any] = {"input_ids": ids}
        if self.family in ("causal", "seq2seq"):
            inputs["use_cache"] = False
        if self.family == "seq2seq":
            inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch_size, SEQ_LEN - 2), generator=g)
        return inputs


def _shrunk_kwargs(default: Any, model_type: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    fields = default.to_dict()
    for key, value in SHRINK.items():
        if key in fields and (
            (isinstance(fields[key], int) and not isinstance(fields[key], bool))
            or (fields[key] is None and key in NULLABLE)
        ):
            kwargs[key] = value
    for key, value in fields.items():  # special token ids inside the tiny vocabulary
        if key.endswith("_token_id") and isinstance(value, int) and value >= VOCAB:
            kwargs[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key, 3)
    for key, value in fields.items():  # per-stage lists (Swin, ConvNeXt): two short stages
        if key in ("depths",) and isinstance(value, list):
            kwargs[key] = [1] * 2
        if key in ("hidden_sizes",) and isinstance(value, list):
            kwargs[key] = [16, 32]
        if key in ("num_heads",) and isinstance(value, list):
            kwargs[key] = [2, 4]
    for key, value in fields.items():  # nested configs (text_config, vision_config, ...)
        sub = getattr(default, key, None)
        if hasattr(sub, "to_dict") and hasattr(sub, "model_type"):
            sub_kwargs = {k: v for k, v in sub.to_dict().items() if k not in ("layer_types",)}
            kwargs[key] = {**sub_kwargs, **_shrunk_kwargs(sub, getattr(sub, "model_type", ""))}
    for key, value in OVERRIDES.get(model_type, {}).items():
        if value is None:
            kwargs.pop(key, None)
        else:
            kwargs[key] = value
    return kwargs


def tiny_config(config_class: type, model_type: str) -> Any:
    """``config_class`` with every size field shrunk (see :data:`SHRINK` and :data:`OVERRIDES`)."""
    return config_class(**_shrunk_kwargs(config_class(), model_type))


FAMILIES = ("seq2seq", "encoder", "vision", "causal")
TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "encoder": "SEQ_CLS", "vision": None}


def all_cases() -> list[ArchCase]:
    """Every model type of the four families (skipped ones included), in mapping order."""
    from transformers.models.auto import modeling_auto as auto

    mappings = {
        "seq2seq": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        "encoder": auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        "vision": auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        "causal": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    }
    seen: set[str] = set()
    out: list[ArchCase] = []
    for family in FAMILIES:
        for model_type, class_name in mappings[family].items():
            if model_type in seen:
                continue
            seen.add(model_type)
            if family == "encoder":
                class_name = auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
                if class_name is None:
                    continue
            if isinstance(class_name, (tuple, list)):
                class_name = class_name[0]
            out.append(ArchCase(model_type, family, class_name, TASK_TYPES[family]))
    return out


ARCH_CASES: list[ArchCase] = [c for c in all_cases() if c.model_type not in SKIP]
ARCH_IDS = [c.model_type for c in ARCH_CASES]
