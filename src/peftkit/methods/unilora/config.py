"""``UniLoraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...config_checks import check_layer_selection
from ...types import PeftType

#: ``bias`` values: which biases train besides the adapter
UNILORA_BIAS = ("none", "all", "unilora_only")


@dataclass
class UniLoraConfig(PeftConfig):
    """Configuration of a Uni-LoRA adapter (field names and defaults of the reference's ``UniLoraConfig``).

    Uni-LoRA (https://arxiv.org/abs/2506.00799) trains ONE vector ``unilora_theta_d: (theta_d_length,)`` for the
    whole model. Every entry of every adapted layer's LoRA factors ``A: (r, in)`` and ``B: (out, r)`` is a fixed
    entry of ``theta_d`` times a fixed scale: ``A[i, j] = theta_d[idx_A[i, j]] / sqrt(count(idx_A[i, j]))`` (likewise
    ``B``), where the indices are a balanced random assignment drawn from ``proj_seed`` over all adapted layers
    together (each ``theta_d`` entry used ``floor`` or ``ceil`` of ``(total factor entries) / theta_d_length``
    times) and ``count(k)`` is how often entry ``k`` is used. ``ΔW = B A`` (no further scaling). ``theta_d`` starts
    ``U(-init_theta_d_bound, init_theta_d_bound)`` (``init_weights=False``: ``N(0, 1)``), so a fresh adapter is not
    the identity. ``save_indices`` also saves the indices and scales of every layer (else they are regenerated
    bit-exactly from ``proj_seed`` on load).
    """

    r: int = 4
    proj_seed: int = 42
    theta_d_length: int = 256
    target_modules: list[str] | set[str] | str | None = None
    unilora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.UNILORA
        self.target_modules = as_set(self.target_modules)
        for name in ("r", "theta_d_length"):
            value = getattr(self, name)
            check(is_int(value) and value >= 1, name, value, "allowed: a positive int")
        check(is_int(self.proj_seed), "proj_seed", self.proj_seed, "allowed: an int (the index assignment's seed)")
        check(is_number(self.unilora_dropout) and 0 <= self.unilora_dropout <= 1, "unilora_dropout",
              self.unilora_dropout, "allowed: a float with 0 <= unilora_dropout <= 1")
        check(is_number(self.init_theta_d_bound) and self.init_theta_d_bound > 0, "init_theta_d_bound",
              self.init_theta_d_bound, "allowed: a float > 0")
        check(self.bias in UNILORA_BIAS, "bias", self.bias, f"allowed: one of {list(UNILORA_BIAS)}")
        for name in ("fan_in_fan_out", "init_weights", "save_indices"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern,
                              str_targets=True, pattern_needs_layers=False)
