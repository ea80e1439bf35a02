"""``IA3Config``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check
from ...types import PeftType
from ..lora.config import _check_modules_field


@dataclass
class IA3Config(PeftConfig):
    """Configuration of an (IA)³ adapter (field names and defaults of the reference's ``IA3Config``).

    Each targeted layer learns a vector ``l``: ``(out, 1)`` for a normal module, where the output is scaled
    (``y = base(x) ⊙ l``), or ``(1, in)`` for a module listed in ``feedforward_modules``, where the input is scaled
    (``y = base(x ⊙ l)``). ``feedforward_modules`` must be a subset of ``target_modules`` when both are lists; when it
    is None it comes from the default table of the model type (peftkit: no feedforward module when the model type
    has no entry, where the reference raises).

    ``fan_in_fan_out`` need not be set: peftkit detects GPT-2 ``Conv1D`` per layer and never rewrites this field.
    """

    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    feedforward_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.IA3
        self.target_modules = as_set(self.target_modules)
        self.exclude_modules = as_set(self.exclude_modules)
        self.feedforward_modules = as_set(self.feedforward_modules)
        _check_modules_field("target_modules", self.target_modules)
        _check_modules_field("exclude_modules", self.exclude_modules)
        _check_modules_field("feedforward_modules", self.feedforward_modules)
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        check(
            self.modules_to_save is None or (not isinstance(self.modules_to_save, str)
                                              and all(isinstance(m, str) for m in self.modules_to_save)),
            "modules_to_save", self.modules_to_save, "allowed: None or a list of module names",
        )
        if isinstance(self.feedforward_modules, set) and isinstance(self.target_modules, set):
            extra = sorted(_not_targeted(self.feedforward_modules, self.target_modules))
            check(not extra, "feedforward_modules", sorted(self.feedforward_modules),
                  f"allowed: a subset of target_modules {sorted(self.target_modules)}; not in it: {extra}")


def _not_targeted(feedforward: set[str], targets: set[str]) -> set[str]:
    """The ``feedforward_modules`` entries that name no module of ``targets``: an entry counts as targeted when it
    equals a target or is the last components of one (``down_proj`` of ``model.layers.0.mlp.down_proj``, the form
    the stored copy of a config holds once ``"all-linear"`` or a regex is resolved to full module names)."""
    return {f for f in feedforward if not any(t == f or t.endswith("." + f) for t in targets)}
