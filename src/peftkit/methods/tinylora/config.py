"""``TinyLoraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...config_checks import check_layer_selection
from ...types import PeftType

#: the values of ``bias`` (``"tinylora_only"`` trains the biases of the adapted layers)
TINYLORA_BIAS = ("none", "all", "tinylora_only")


@dataclass
class TinyLoraConfig(PeftConfig):
    """Configuration of a TinyLoRA adapter (field names and defaults of the reference's ``TinyLoraConfig``).

    TinyLoRA ("Learning to Reason in 13 Parameters", arXiv:2602.04118) adapts ``W: (out, in)`` by
    ``ΔW = B @ R @ A`` with the frozen truncated SVD of ``W`` (``A = sqrt(S_r) V_r: (r, in)``,
    ``B = U_r sqrt(S_r): (out, r)``) and ``R = Σ_i v[i] P[i]: (r, r)``, where ``P: (u, r, r)`` is a frozen random
    projection drawn from ``N(0, 1/r)`` with seed ``projection_seed + layer index`` and ``v: (u,)`` is the only
    trained tensor. ``weight_tying`` in ``[0, 1]`` shares one ``v`` among groups of consecutive adapted layers
    (1.0: one ``v`` for the whole model). ``init_weights``: True (``v = 0``: identity), ``"uniform"``
    (``U(-init_v_bound, init_v_bound)``) or False (uninitialised). Linear, GPT-2 ``Conv1D`` and Embedding layers.
    """

    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = 0.02
    target_modules: list[str] | set[str] | str | None = None
    tinylora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TINYLORA
        self.target_modules = as_set(self.target_modules)
        for name in ("r", "u"):
            value = getattr(self, name)
            check(is_int(value) and value >= 1, name, value, "allowed: a positive int")
        check(is_number(self.weight_tying) and 0.0 <= self.weight_tying <= 1.0, "weight_tying", self.weight_tying,
              "allowed: a float between 0.0 (no sharing) and 1.0 (one v for all layers)")
        check(is_int(self.projection_seed), "projection_seed", self.projection_seed,
              "allowed: an int (the seed of the projections P)")
        for name in ("save_projection", "fan_in_fan_out"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        check(is_number(self.init_v_bound) and self.init_v_bound >= 0, "init_v_bound", self.init_v_bound,
              "allowed: a float >= 0")
        check(is_number(self.tinylora_dropout) and 0 <= self.tinylora_dropout < 1, "tinylora_dropout",
              self.tinylora_dropout, "allowed: a float with 0 <= tinylora_dropout < 1")
        check(self.bias in TINYLORA_BIAS, "bias", self.bias, f"allowed: one of {list(TINYLORA_BIAS)}")
        check(isinstance(self.init_weights, bool) or self.init_weights == "uniform", "init_weights",
              self.init_weights, "allowed: True (v = 0, identity), False (uninitialised) or 'uniform'")
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern,
                              pattern_message="When `layers_pattern` is specified, `layers_to_transform` must also "
                              "be specified.")
