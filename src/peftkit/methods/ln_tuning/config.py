"""``LNTuningConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set
from ...types import PeftType


@dataclass
class LNTuningConfig(PeftConfig):
    """Configuration of LayerNorm tuning (field names and defaults of the reference's ``LNTuningConfig``).

    LN tuning (https://huggingface.co/papers/2312.11420) trains a copy of each targeted module (the model's
    LayerNorm / RMSNorm layers by default: ``weight: (hidden,)`` and, for LayerNorm, ``bias: (hidden,)``) per adapter;
    the base module stays frozen. ``target_modules=None`` takes the model type's default table
    (``TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING``). Any module can be targeted; only it is copied.
    """

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # type checks of the module-name fields and modules_to_save
        self.peft_type = PeftType.LN_TUNING
        self.target_modules = as_set(self.target_modules)
        self.exclude_modules = as_set(self.exclude_modules)
