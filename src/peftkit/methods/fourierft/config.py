"""``FourierFTConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...config_checks import check_layer_selection
from ...types import PeftType

#: ``bias`` values besides "<anything>_only" (the reference documents "fourier_only"; its tuner accepts any "_only")
FOURIERFT_BIAS = ("none", "all")


@dataclass
class FourierFTConfig(PeftConfig):
    """Configuration of a FourierFT adapter (field names and defaults of the reference's ``FourierFTConfig``).

    FourierFT (https://huggingface.co/papers/2405.03003) learns ``n_frequency`` real spectral coefficients
    ``fourierft_spectrum: (n_frequency,)`` of a targeted ``W: (out, in)`` at frequencies ``(u_k, v_k)`` drawn once
    from ``random_loc_seed`` (a ``torch.randperm(out * in)`` prefix, as the reference, so the indices are never
    saved): ``ΔW = Re(IFFT2(S)) · scaling`` with ``S: (out, in)`` zero except ``S[u_k, v_k] = spectrum[k]``.
    ``init_weights=False`` (the default, as the reference) draws the spectrum from ``N(0, 1)``; ``True`` zeroes it
    (identity at init). ``n_frequency_pattern`` maps module-name regexes to a per-layer ``n_frequency``.
    """

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int | None = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict | None = field(default_factory=dict)
    init_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.FOURIERFT
        _check_targeting(self)
        check(is_int(self.n_frequency) and self.n_frequency >= 1, "n_frequency", self.n_frequency,
              "allowed: an int >= 1 (and at most in_features * out_features of every targeted layer)")
        check(is_number(self.scaling), "scaling", self.scaling, "allowed: a number")
        # the reference accepts None and then fails (RuntimeError) in torch.Generator().manual_seed(None) while injecting
        check(is_int(self.random_loc_seed), "random_loc_seed", self.random_loc_seed,
              "allowed: an int (the frequency locations are drawn from it and never saved)")
        for name in ("fan_in_fan_out", "init_weights"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        if self.n_frequency_pattern is None:
            self.n_frequency_pattern = {}
        check(isinstance(self.n_frequency_pattern, dict), "n_frequency_pattern", self.n_frequency_pattern,
              "allowed: a dict {module-name regex: int >= 1}")
        for key, value in self.n_frequency_pattern.items():
            check(is_int(value) and value >= 1, f"n_frequency_pattern[{key!r}]", value, "allowed: an int >= 1")


def _check_targeting(config: FourierFTConfig) -> None:
    """The reference's rules for ``target_modules`` / ``layers_to_transform`` / ``layers_pattern`` and ``bias``."""
    config.target_modules = as_set(config.target_modules)
    config.exclude_modules = as_set(config.exclude_modules)
    check(config.bias in FOURIERFT_BIAS or (isinstance(config.bias, str) and config.bias.endswith("_only")), "bias",
          config.bias, "allowed: 'none', 'all' or 'fourier_only' (the adapted layers' biases)")
    check_layer_selection(config.target_modules, config.layers_to_transform, config.layers_pattern, str_targets=True)
