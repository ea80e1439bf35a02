"""``AdaLoraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ...config import check, is_int, is_number
from ...errors import ConfigTypeError, PeftWarning
from ...types import PeftType
from ..lora.config import LoraConfig


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter (field names and defaults of the reference's ``AdaLoraConfig``).

    Each targeted weight ``W: (out, in)`` gets an SVD-form update ``ΔW = B @ (A * E) * scaling / (ranknum + 1e-5)``
    with ``A: (init_r, in)``, ``E: (init_r, 1)``, ``B: (out, init_r)``, ``scaling = lora_alpha`` (``init_r`` when
    ``lora_alpha <= 0``) and ``ranknum = init_r``. Training has three phases: ``tinit`` warm-up steps at the full
    budget, a cubic budget decrease until ``total_step - tfinal``, then ``tfinal`` steps at ``target_r`` per matrix.
    The rank allocation masks entries of ``E`` and records which survive in ``rank_pattern``
    (``{"<module path>.lora_E": [bool] * init_r}``), which saving uses to slice the tensors.

    ``r`` is not used (use ``init_r``); ``total_step`` is required.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        rank_pattern = self.rank_pattern
        self.rank_pattern = {}  # LoraConfig validates int ranks; AdaLoRA's patterns are bool lists
        super().__post_init__()
        self.rank_pattern = rank_pattern
        self.peft_type = PeftType.ADALORA
        self._validate_adalora()
        if self.r != 8:
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored. If you intended to set the "
                          "initial rank, use `init_r` instead.", PeftWarning, stacklevel=3)

    def _validate_adalora(self) -> None:
        check(not self.use_dora, "use_dora", self.use_dora, "AdaLoRA does not support DoRA; allowed: False")
        check(not self.loftq_config, "loftq_config", self.loftq_config, "AdaLoRA does not support LoftQ; allowed: {}")
        check(isinstance(self.init_lora_weights, bool), "init_lora_weights", self.init_lora_weights,
              "AdaLoRA allowed: True (A, B ~ N(0, 0.02), E = 0) or False (all ~ N(0, 1))")
        check(is_int(self.total_step) and self.total_step > 0, "total_step", self.total_step,
              "AdaLoRA needs the total number of training steps; allowed: an int > 0")
        check(is_int(self.init_r) and self.init_r >= 1, "init_r", self.init_r, "allowed: an int >= 1")
        check(is_int(self.target_r) and self.target_r >= 0, "target_r", self.target_r, "allowed: an int >= 0")
        if self.target_r > self.init_r:
            warnings.warn(f"target_r={self.target_r} > init_r={self.init_r}: the rank allocation will not prune "
                          "anything (the reference fails at the first allocation)", PeftWarning, stacklevel=4)
        for name in ("tinit", "tfinal"):
            check(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, getattr(self, name),
                  "allowed: an int >= 0")
        check(is_int(self.deltaT) and self.deltaT >= 1, "deltaT", self.deltaT, "allowed: an int >= 1")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(is_number(value) and 0 < value < 1, name, value, "allowed: a float with 0 < beta < 1")
        check(is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0, "orth_reg_weight",
              self.orth_reg_weight, "allowed: a number >= 0")
        assert self.total_step is not None
        check(self.tinit < self.total_step - self.tfinal, "tinit", self.tinit,
              f"the schedule leaves no budgeting phase: tinit must be < total_step - tfinal "
              f"({self.total_step} - {self.tfinal}); decrease tfinal/tinit or increase total_step")
        _check_rank_pattern(self.rank_pattern)


def _check_rank_pattern(pattern: object) -> None:
    ok = pattern is None or (isinstance(pattern, dict) and all(
        isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(b, bool) for b in v)
        for k, v in pattern.items()
    ))
    if not ok:
        raise ConfigTypeError("rank_pattern", pattern, "AdaLoRA allowed: None or {'<module path>.lora_E': [bool, ...]}")
