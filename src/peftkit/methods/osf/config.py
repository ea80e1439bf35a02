"""``OSFConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...types import PeftType

_RANK_ALLOWED = ("allowed: None, an int >= 1 (frozen singular directions) or a float in (0, 1] (a fraction of "
                 "min(out, in) per layer)")


def _rank_ok(value: object) -> bool:
    return value is None or (is_int(value) and value >= 1) or (is_number(value) and value > 0)


@dataclass
class OSFConfig(PeftConfig):
    """Configuration of an OSF adapter (orthogonal subspace fine-tuning; the reference's ``OSFConfig``).

    Each targeted ``nn.Linear`` weight ``W = U diag(S) Vᵀ: (out, in)`` is split at ``k = effective_rank``: the top
    ``k`` singular directions stay frozen (``U_high``, ``S_high``, ``V_high``); the rest, ``U_low: (out, m − k)``,
    ``S_low: (m − k,)``, ``V_low: (m − k, in)`` with ``m = min(out, in)``, are trained and their gradients are
    projected orthogonal to the frozen subspace. The layer computes ``W x + (U_low S_low V_low − U₀ S₀ V₀) x`` with
    ``U₀ S₀ V₀`` the initial low part (rebuilt from ``W`` on load, never saved).

    ``effective_rank``: None (half of ``m``), an int, or a float in (0, 1] (a fraction of ``m``); ``rank_pattern``
    overrides it per module: ``{regex: value}``, the first key found in the module name (``re.search``) wins, as in
    the reference. ``target_svd_config`` is accepted and ignored (as the reference).
    """

    effective_rank: int | float | None = None
    target_modules: list[str] | set[str] | str | None = None
    rank_pattern: dict[str, int | float] | None = None
    init_weights: bool | None = True
    modules_to_save: list[str] | None = None
    target_svd_config: dict[str, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.OSF
        self.target_modules = as_set(self.target_modules)
        check(_rank_ok(self.effective_rank), "effective_rank", self.effective_rank, _RANK_ALLOWED)
        for key, value in (self.rank_pattern or {}).items():
            check(_rank_ok(value) and value is not None, f"rank_pattern[{key!r}]", value, _RANK_ALLOWED)
        check(self.init_weights is None or isinstance(self.init_weights, bool), "init_weights", self.init_weights,
              "allowed: True, False or None")
        check(self.target_svd_config is None or isinstance(self.target_svd_config, dict), "target_svd_config",
              self.target_svd_config, "allowed: None or a dict {parameter name: rank} (ignored)")
