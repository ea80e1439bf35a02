"""``HRAConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import PeftConfig, as_set, check, is_int
from ...config_checks import check_layer_selection
from ...types import PeftType


def check_shared_adapter_fields(config: Any, bias_choices: tuple[str, ...],
                                pattern_needs_layers: bool = True) -> None:
    """Checks shared by ``HRAConfig`` and ``MissConfig`` (the reference's rules for ``target_modules``,
    ``layers_to_transform``, ``layers_pattern`` and ``bias``); raises ``ConfigError`` naming the field."""
    config.target_modules = as_set(config.target_modules)
    config.exclude_modules = as_set(config.exclude_modules)
    check(is_int(config.r) and config.r >= 1, "r", config.r, "allowed: an int >= 1")
    check(config.bias in bias_choices, "bias", config.bias, f"allowed: {list(bias_choices)}")
    check_layer_selection(config.target_modules, config.layers_to_transform, config.layers_pattern, str_targets=True,
                          pattern_needs_layers=pattern_needs_layers)


@dataclass
class HRAConfig(PeftConfig):
    """Configuration of an HRA adapter (Householder reflection adaptation; field names and defaults of the
    reference's ``HRAConfig``).

    A targeted weight ``W: (out, in)`` (convolutions: ``(out, in·kh·kw)``) becomes ``W R`` with the orthogonal
    ``R = H_1 ⋯ H_r``, ``H_i = I - 2 u_i u_iᵀ / |u_i|²``, and ``hra_u = [u_1 … u_r]: (in, r)`` the trainable
    tensor; with ``apply_GS`` the columns are Gram-Schmidt orthonormalised to ``Q`` and ``R = I - 2 Q Qᵀ``.
    ``init_weights=True`` repeats each of ``r/2`` random columns twice, so that ``R = I`` at init (an odd ``r``
    cannot be identity: it warns and draws every column at random, as the reference).
    """

    r: int = 8
    apply_GS: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.HRA
        check_shared_adapter_fields(self, ("none", "all", "hra_only"))
        for name in ("apply_GS", "init_weights"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
