"""``VeraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...config_checks import check_layer_selection
from ...types import PeftType

#: the values of ``bias`` (the reference's: ``"vera_only"`` trains the biases of the adapted layers)
VERA_BIAS = ("none", "all", "vera_only")


@dataclass
class VeraConfig(PeftConfig):
    """Configuration of a VeRA adapter (field names and defaults of the reference's ``VeraConfig``).

    VeRA (https://huggingface.co/papers/2310.11454) adapts ``W: (out, in)`` by
    ``ΔW = diag(λ_b) @ B[:out] @ diag(λ_d) @ A[:, :in]`` where ``A: (r, max_in)`` and ``B: (max_out, r)`` are frozen
    random projections shared by every adapted layer of the model (generated from ``projection_prng_key``; saved
    in the checkpoint when ``save_projection``) and only ``vera_lambda_d: (r,)`` (initialised to ``d_initial``) and
    ``vera_lambda_b: (out,)`` (initialised to zero: identity at init) train. Linear and GPT-2 ``Conv1D`` layers.
    """

    r: int = 256
    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.VERA
        self.target_modules = as_set(self.target_modules)
        check(is_int(self.r) and self.r >= 1, "r", self.r, "allowed: an int >= 1")
        check(is_int(self.projection_prng_key), "projection_prng_key", self.projection_prng_key,
              "allowed: an int (the seed of the shared projections)")
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        check(is_number(self.vera_dropout) and 0 <= self.vera_dropout < 1, "vera_dropout", self.vera_dropout,
              "allowed: a float with 0 <= vera_dropout < 1")
        check(is_number(self.d_initial), "d_initial", self.d_initial, "allowed: a number (small values <= 0.1)")
        check(self.bias in VERA_BIAS or (isinstance(self.bias, str) and self.bias.endswith("_only")), "bias",
              self.bias, f"allowed: {list(VERA_BIAS)} (any '<name>_only' trains the adapted layers' biases)")
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern)
