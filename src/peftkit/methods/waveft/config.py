"""``WaveFTConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...types import PeftType
from .wavelets import WAVELET_FAMILIES


@dataclass
class WaveFTConfig(PeftConfig):
    """Configuration of a WaveFT adapter (field names and defaults of the reference's ``WaveFTConfig``).

    WaveFT (https://huggingface.co/papers/2505.12532) learns ``n_frequency`` wavelet coefficients
    ``waveft_spectrum: (n_frequency,)`` of a targeted ``W: (out, in)`` at positions drawn once from
    ``random_loc_seed`` (a ``torch.randperm(out * in)`` prefix, as the reference, so they are never saved):
    ``ΔW = scaling · IDWT2(C)`` with ``C`` zero but for the coefficients (one level of the ``wavelet_family``
    inverse transform, padded and cropped to ``(out, in)``); ``use_idwt=False`` uses ``C`` itself.
    ``init_weights=True`` (the default) zeroes the coefficients (identity at init); False draws ``0.01 · N(0, 1)``.
    ``n_frequency_pattern`` maps module-name regexes to a per-layer count; ``proportional_parameters`` spreads
    ``n_frequency · #layers`` over the targeted layers in proportion to ``out · in`` (at least 1 each).
    """

    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    n_frequency_pattern: dict | None = field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.WAVEFT
        self.target_modules = as_set(self.target_modules)
        self.exclude_modules = as_set(self.exclude_modules)
        _check_layer_selection(self)
        check(is_int(self.n_frequency) and self.n_frequency >= 1, "n_frequency", self.n_frequency,
              "allowed: an int >= 1 (and at most in_features * out_features of every targeted layer)")
        check(is_number(self.scaling), "scaling", self.scaling, "allowed: a number")
        check(self.wavelet_family in WAVELET_FAMILIES, "wavelet_family", self.wavelet_family,
              f"allowed: one of {list(WAVELET_FAMILIES)} (the families with reconstruction filters)")
        check(is_int(self.random_loc_seed), "random_loc_seed", self.random_loc_seed,
              "allowed: an int (the coefficient locations are drawn from it and never saved)")
        for name in ("use_idwt", "fan_in_fan_out", "proportional_parameters", "init_weights"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        check(self.bias in ("none", "all") or (isinstance(self.bias, str) and self.bias.endswith("_only")), "bias",
              self.bias, "allowed: 'none', 'all' or 'waveft_only' (the adapted layers' biases)")
        if self.n_frequency_pattern is None:
            self.n_frequency_pattern = {}
        check(isinstance(self.n_frequency_pattern, dict), "n_frequency_pattern", self.n_frequency_pattern,
              "allowed: a dict {module-name regex: int >= 1}")
        for key, value in self.n_frequency_pattern.items():
            check(is_int(value) and value >= 1, f"n_frequency_pattern[{key!r}]", value, "allowed: an int >= 1")


def _check_layer_selection(config: WaveFTConfig) -> None:
    """``layers_to_transform`` / ``layers_pattern`` need a list of module names, and the pattern needs the indices."""
    ltt, pattern = config.layers_to_transform, config.layers_pattern
    check(ltt is None or is_int(ltt) or (isinstance(ltt, (list, tuple)) and all(is_int(i) for i in ltt)),
          "layers_to_transform", ltt, "allowed: None, an int or a list of ints")
    if isinstance(config.target_modules, str):
        check(ltt is None, "layers_to_transform", ltt, "not allowed when target_modules is a regex str")
        check(pattern is None, "layers_pattern", pattern, "not allowed when target_modules is a regex str")
    check(not (pattern and ltt is None), "layers_pattern", pattern, "allowed only together with layers_to_transform")
