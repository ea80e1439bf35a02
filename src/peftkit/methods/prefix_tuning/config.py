"""``PrefixTuningConfig``: trainable key/value prefixes in every attention layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...config import check, is_int
from ...types import PeftType
from ..prompt.config import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: ``num_virtual_tokens`` key/value pairs prepended to the attention cache of every layer.

    Args:
        encoder_hidden_size: hidden size of the projection MLP; ``token_dim`` when None.
        prefix_projection: compute the prefix with ``Embedding -> Linear -> Tanh -> Linear`` instead of storing it.
        init_weights: None (random) or ``"zero"`` (the prefix starts at zero).
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: Literal["zero"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PREFIX_TUNING
        check(isinstance(self.prefix_projection, bool), "prefix_projection", self.prefix_projection,
              "allowed: True or False")
        check(self.init_weights in (None, "zero"), "init_weights", self.init_weights, "allowed: None or 'zero'")
        check(self.encoder_hidden_size is None or (is_int(self.encoder_hidden_size) and self.encoder_hidden_size >= 1),
              "encoder_hidden_size", self.encoder_hidden_size, "allowed: None or an int >= 1")
