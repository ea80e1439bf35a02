"""``LoHaConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig, check
from ...types import PeftType
from ..lycoris import validate_lycoris_config


@dataclass
class LoHaConfig(PeftConfig):
    """Configuration of a LoHa adapter (field names and defaults of the reference's ``LoHaConfig``).

    The update of a targeted weight ``W: (out, in)`` is ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r`` with
    ``w*_a: (out, r)`` and ``w*_b: (r, in)`` (convolutions: ``in · kernel`` columns). With ``use_effective_conv2d``
    a convolution with a kernel larger than 1 uses CP factors ``hada_t1/t2: (r, r, *kernel)``.
    """

    rank_pattern: dict[str, int] | None = field(default_factory=dict)
    alpha_pattern: dict[str, float] | None = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LOHA
        validate_lycoris_config(self)
        check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "allowed: True or False")
