"""``HiraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...types import PeftType


def is_gaussian(init_weights: object) -> bool:
    """True for the ``"gaussian"`` initialisation (any case, as the reference compares ``init_weights.lower()``)."""
    return isinstance(init_weights, str) and init_weights.lower() == "gaussian"


@dataclass
class HiraConfig(PeftConfig):
    """Configuration of a HiRA adapter (field names and defaults of the reference's ``HiraConfig``).

    HiRA (Hadamard high-rank adaptation, https://openreview.net/pdf?id=TwJrTz9cRS) learns ``hira_A: (r, in)`` and
    ``hira_B: (out, r)`` for a targeted ``W0: (out, in)`` and adds ``ΔW = W0 ⊙ (B A)``: a Hadamard product with the
    frozen weight, so the update has (up to) the rank of ``W0`` although it trains ``r (in + out)`` numbers.
    Embeddings ``W0: (num, dim)`` hold ``hira_embedding_A: (r, num)`` and ``hira_embedding_B: (dim, r)``
    (``ΔW = W0 ⊙ (B A)ᵀ``); convolutions ``W0: (out, in, *k)`` hold ``hira_A: (r, in, *k)`` and
    ``hira_B: (out, r, 1, ...)``. There is no scaling factor.

    ``init_weights``: True (default) Kaiming-uniform ``A`` and zero ``B`` (identity at init); ``"gaussian"``
    ``A ~ N(0, 1/r²)`` on linear layers (convolutions: as True); False (or None) random ``A`` and ``B`` (not
    identity, for tests). Embeddings start identity for True / ``"gaussian"`` / None (``A = 0``, ``B ~ N(0, 1)``).
    ``rank_pattern`` maps module-name regexes to a per-layer ``r``.
    """

    r: int = 32
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_weights: bool | str | None = field(default=True, repr=False)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.HIRA
        self.target_modules = as_set(self.target_modules)
        self.exclude_modules = as_set(self.exclude_modules)
        if self.rank_pattern is None:
            self.rank_pattern = {}
        check(is_int(self.r) and self.r >= 1, "r", self.r, "allowed: an int >= 1")
        check(is_number(self.hira_dropout) and 0 <= self.hira_dropout < 1, "hira_dropout", self.hira_dropout,
              "allowed: a float with 0 <= hira_dropout < 1")
        check(isinstance(self.fan_in_fan_out, bool), "fan_in_fan_out", self.fan_in_fan_out, "allowed: True or False")
        # the reference accepts any string here and fails while injecting (linear layers) or treats it as True (conv)
        check(self.init_weights is None or isinstance(self.init_weights, bool) or is_gaussian(self.init_weights),
              "init_weights", self.init_weights, "allowed: True, False, None or 'gaussian'")
        check(isinstance(self.rank_pattern, dict), "rank_pattern", self.rank_pattern,
              "allowed: a dict {module-name regex: int >= 1}")
        for key, rank in self.rank_pattern.items():
            check(is_int(rank) and rank >= 1, f"rank_pattern[{key!r}]", rank, "allowed: an int >= 1")
        _check_targeting(self)


def _check_targeting(config: HiraConfig) -> None:
    """The reference's rules for ``layers_to_transform`` / ``layers_pattern`` with a regex ``target_modules``."""
    ltt = config.layers_to_transform
    check(ltt is None or is_int(ltt) or (isinstance(ltt, (list, tuple)) and all(is_int(i) for i in ltt)),
          "layers_to_transform", ltt, "allowed: None, an int or a list of ints")
    is_regex = isinstance(config.target_modules, str)
    check(not (is_regex and ltt is not None), "layers_to_transform", ltt,
          "layers_to_transform cannot be used when target_modules is a str; use a list of module names")
    check(not (is_regex and config.layers_pattern is not None), "layers_pattern", config.layers_pattern,
          "layers_pattern cannot be used when target_modules is a str; use a list of module names")
