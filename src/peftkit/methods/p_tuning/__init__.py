"""P-tuning: registration of the method with the registry."""

from __future__ import annotations

from ...registry import register_method
from ...types import PeftType
from ..prompt import prompt_method_spec
from .config import PromptEncoderConfig, PromptEncoderReparameterizationType
from .model import PromptEncoder

P_TUNING = register_method(
    prompt_method_spec(
        peft_type=PeftType.P_TUNING,
        config_cls=PromptEncoderConfig,
        tuner_name="PTuningModel",
        encoder=lambda config, word_embeddings: PromptEncoder(config),
        routing="embeddings",
        example_configs=(
            {"num_virtual_tokens": 3, "encoder_hidden_size": 16},
            {"num_virtual_tokens": 2, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8},
        ),
    )
)

__all__ = ["P_TUNING", "PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
