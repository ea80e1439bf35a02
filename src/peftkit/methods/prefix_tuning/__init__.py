"""Prefix tuning: registration of the method with the registry."""

from __future__ import annotations

from ...registry import register_method
from ...types import PeftType
from ..prompt import prompt_method_spec
from .config import PrefixTuningConfig
from .model import PrefixEncoder

PREFIX_TUNING = register_method(
    prompt_method_spec(
        peft_type=PeftType.PREFIX_TUNING,
        config_cls=PrefixTuningConfig,
        tuner_name="PrefixTuningModel",
        encoder=lambda config, word_embeddings: PrefixEncoder(config),
        routing="prefix",
        example_configs=(
            {"num_virtual_tokens": 3},
            {"num_virtual_tokens": 2, "prefix_projection": True, "encoder_hidden_size": 16},
        ),
    )
)

__all__ = ["PREFIX_TUNING", "PrefixEncoder", "PrefixTuningConfig"]
