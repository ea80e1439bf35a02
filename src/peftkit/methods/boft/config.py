"""``BOFTConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...config_checks import check_layer_selection
from ...types import PeftType
from ..lora.config import _check_modules_field

#: values of ``bias``: which biases train besides the adapter (``"boft_only"``: those of the adapted layers)
BIAS_VALUES = ("none", "all", "boft_only")


@dataclass
class BOFTConfig(PeftConfig):
    """Configuration of a BOFT adapter (field names and defaults of the reference's ``BOFTConfig``).

    BOFT rotates the input side of each targeted weight ``W: (out, n)`` (``n = in_features``, or
    ``in_channels · kh · kw`` for a convolution) with an orthogonal matrix ``R`` made of ``boft_n_butterfly_factor``
    butterfly factors, each block-diagonal with ``boft_block_num`` orthogonal blocks of size ``boft_block_size``
    (``boft_block_size · boft_block_num = n``; give exactly one of the two, the other 0), and scales the outputs by a
    learned ``boft_s: (out,)``: ``y = x (diag(s) W Rᵀ)ᵀ + b``. Saved tensors: ``boft_R: (factors, blocks, size,
    size)`` and ``boft_s`` (``(out, 1)`` on Linear, ``(1, out)`` on Conv2d).

    ``boft_dropout`` (training only) replaces ``int(boft_dropout · blocks)`` random blocks of one random factor by
    the identity. ``fan_in_fan_out`` is kept for file compatibility: BOFT adapts ``nn.Linear`` and ``nn.Conv2d`` only.
    """

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.BOFT
        self.target_modules = as_set(self.target_modules)
        self.exclude_modules = as_set(self.exclude_modules)
        _check_modules_field("target_modules", self.target_modules)
        _check_modules_field("exclude_modules", self.exclude_modules)
        self._check_blocks()
        check(is_number(self.boft_dropout) and 0 <= self.boft_dropout <= 1, "boft_dropout", self.boft_dropout,
              "allowed: a float with 0 <= boft_dropout <= 1")
        for name in ("fan_in_fan_out", "init_weights"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        check(self.bias in BIAS_VALUES, "bias", self.bias, f"allowed: one of {list(BIAS_VALUES)}")
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern)

    def _check_blocks(self) -> None:
        """Exactly one of ``boft_block_size`` / ``boft_block_num`` is non-zero (their product is the layer's width,
        so giving both over-determines it); both are ints >= 0 and the butterfly factor an int >= 1."""
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            check(is_int(value) and value >= 0, name, value, "allowed: an int >= 0")
        check(self.boft_block_size != 0 or self.boft_block_num != 0, "boft_block_size", self.boft_block_size,
              "allowed: non-zero when boft_block_num is 0 (set exactly one of boft_block_size and boft_block_num)")
        check(self.boft_block_size == 0 or self.boft_block_num == 0, "boft_block_num", self.boft_block_num,
              f"allowed: 0 when boft_block_size is set ({self.boft_block_size}); set exactly one of "
              "boft_block_size and boft_block_num, since boft_block_size x boft_block_num == in_features")
        check(is_int(self.boft_n_butterfly_factor) and self.boft_n_butterfly_factor >= 1, "boft_n_butterfly_factor",
              self.boft_n_butterfly_factor, "allowed: an int >= 1 (1: plain block-diagonal OFT)")
