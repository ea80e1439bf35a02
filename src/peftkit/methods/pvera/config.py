"""``PveraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...config_checks import check_layer_selection
from ...types import PeftType

#: the values of ``bias`` (the reference's: ``"pvera_only"`` trains the biases of the adapted layers)
PVERA_BIAS = ("none", "all", "pvera_only")


@dataclass
class PveraConfig(PeftConfig):
    """Configuration of a PVeRA adapter (field names and defaults of the reference's ``PveraConfig``).

    PVeRA (probabilistic VeRA, https://www.arxiv.org/abs/2512.07703) adapts ``W: (out, in)`` with frozen random
    projections shared by every adapted layer, ``A: (2r, max_in)`` and ``B: (max_out, r)`` (from
    ``projection_prng_key``; saved when ``save_projection``), and trainable ``pvera_lambda_d: (2r,)`` and
    ``pvera_lambda_b: (out,)``: ``[μ, log σ²] = λ_d ⊙ (A[:, :in] x)`` (each ``(r,)``), ``z = μ + ε ⊙ exp(log σ² / 2)``
    with ``ε ~ N(0, 1)`` in training (and at inference when ``sample_at_inference``; ``z = μ`` otherwise), and
    ``y = W x + λ_b ⊙ (B[:out] z)``. ``generator_seed`` seeds a per-adapter CPU generator for ``ε``. Merging uses the
    mean: ``ΔW = diag(λ_b) B[:out] diag(λ_d[:r]) A[:r, :in]``. Linear and GPT-2 ``Conv1D`` layers.
    """

    r: int = 256
    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    sample_at_inference: bool = False
    generator_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PVERA
        self.target_modules = as_set(self.target_modules)
        check(is_int(self.r) and self.r >= 1, "r", self.r, "allowed: an int >= 1")
        check(is_int(self.projection_prng_key), "projection_prng_key", self.projection_prng_key,
              "allowed: an int (the seed of the shared projections)")
        for name in ("save_projection", "fan_in_fan_out", "init_weights", "sample_at_inference"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        check(is_number(self.pvera_dropout) and 0 <= self.pvera_dropout < 1, "pvera_dropout", self.pvera_dropout,
              "allowed: a float with 0 <= pvera_dropout < 1")
        check(is_number(self.d_initial), "d_initial", self.d_initial, "allowed: a number (small values <= 0.1)")
        check(self.bias in PVERA_BIAS or (isinstance(self.bias, str) and self.bias.endswith("_only")), "bias",
              self.bias, f"allowed: {list(PVERA_BIAS)} (any '<name>_only' trains the adapted layers' biases)")
        check(self.generator_seed is None or is_int(self.generator_seed), "generator_seed", self.generator_seed,
              "allowed: None or an int (the seed of the adapter's sampling generator)")
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern)
