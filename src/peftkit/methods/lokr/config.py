"""``LoKrConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import PeftConfig, check, is_int
from ...types import PeftType
from ..lycoris import validate_lycoris_config


@dataclass
class LoKrConfig(PeftConfig):
    """Configuration of a LoKr adapter (field names and defaults of the reference's ``LoKrConfig``).

    The update of a targeted weight ``W: (a·b, c·d)`` is ``ΔW = kron(w1, w2) · alpha / r`` with ``w1: (a, c)`` and
    ``w2: (b, d[, *kernel])``; ``(a, b)`` / ``(c, d)`` are ``factorization(out, decompose_factor)`` /
    ``factorization(in, decompose_factor)``. ``w2`` is low rank (``lokr_w2_a @ lokr_w2_b``) when
    ``r < max(b, d) / 2``; ``w1`` likewise when ``decompose_both`` and ``r < max(a, c) / 2``.
    """

    rank_pattern: dict[str, int] | None = field(default_factory=dict)
    alpha_pattern: dict[str, float] | None = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool | Literal["lycoris"] = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LOKR
        validate_lycoris_config(self)
        check(isinstance(self.init_weights, bool) or self.init_weights == "lycoris", "init_weights",
              self.init_weights, "allowed: True, False or 'lycoris'")
        for name in ("decompose_both", "rank_dropout_scale"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        check(is_int(self.decompose_factor) and (self.decompose_factor == -1 or self.decompose_factor >= 1),
              "decompose_factor", self.decompose_factor, "allowed: -1 or an int >= 1")
