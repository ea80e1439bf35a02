"""Prompt tuning: registration of the method with the registry."""

from __future__ import annotations

from ...registry import register_method
from ...types import PeftType
from ..prompt import prompt_method_spec
from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding

PROMPT_TUNING = register_method(
    prompt_method_spec(
        peft_type=PeftType.PROMPT_TUNING,
        config_cls=PromptTuningConfig,
        tuner_name="PromptTuningModel",
        encoder=PromptEmbedding,
        routing="embeddings",
        example_configs=(
            {"num_virtual_tokens": 3},
            {"num_virtual_tokens": 2, "prompt_tuning_init": "SAMPLE_VOCAB"},
        ),
    )
)

__all__ = ["PROMPT_TUNING", "PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]
