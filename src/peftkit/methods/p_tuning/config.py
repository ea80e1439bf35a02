"""``PromptEncoderConfig`` (P-tuning): virtual tokens produced by a small MLP or LSTM encoder."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ...config import check, is_int, is_number
from ...types import PeftType
from ..prompt.config import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The head of the P-tuning encoder."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: an embedding of the virtual tokens followed by an MLP or a bidirectional LSTM head.

    Args:
        encoder_reparameterization_type: ``MLP`` (``Linear(d,h) ReLU Linear(h,h) ReLU Linear(h,d)``) or ``LSTM``
            (``LSTM(d, h, bidirectional)`` then ``Linear(2h,2h) ReLU Linear(2h,d)``).
        encoder_hidden_size: ``h``; ``token_dim`` when None.
        encoder_num_layers: LSTM layers (ignored, with a warning, for MLP).
        encoder_dropout: LSTM dropout between layers.
    """

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.P_TUNING
        allowed = [m.value for m in PromptEncoderReparameterizationType]
        check(str(self.encoder_reparameterization_type) in allowed, "encoder_reparameterization_type",
              self.encoder_reparameterization_type, f"allowed: {allowed}")
        self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
            str(self.encoder_reparameterization_type)
        )
        check(self.encoder_hidden_size is None or (is_int(self.encoder_hidden_size) and self.encoder_hidden_size >= 1),
              "encoder_hidden_size", self.encoder_hidden_size, "allowed: None or an int >= 1")
        check(is_int(self.encoder_num_layers) and self.encoder_num_layers >= 1, "encoder_num_layers",
              self.encoder_num_layers, "allowed: an int >= 1")
        check(is_number(self.encoder_dropout) and 0 <= self.encoder_dropout < 1, "encoder_dropout",
              self.encoder_dropout, "allowed: a float with 0 <= encoder_dropout < 1")
