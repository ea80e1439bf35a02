"""``OFTConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...config_checks import check_layer_selection
from ...errors import PeftWarning
from ...types import PeftType
from ..lora.config import _check_modules_field

_BIAS = ("none", "all", "oft_only")


@dataclass
class OFTConfig(PeftConfig):
    """Configuration of an OFT adapter (field names and defaults of the reference's ``OFTConfig``).

    Each targeted layer with input size ``in`` learns ``r`` orthogonal blocks ``R_i: (b, b)``, ``r · b = in``,
    and computes ``base(x @ blockdiag(R_1..R_r))``. Give exactly one of ``r`` (number of blocks) and
    ``oft_block_size`` (``b``), the other 0; a value that does not divide a layer's ``in`` is moved to the nearest
    divisor for that layer, with a warning (the reference's rule). Each block is stored as the ``b(b-1)/2`` free
    entries of a skew-symmetric ``Q`` and becomes ``R = (I - Q)(I + Q)⁻¹`` (Cayley) or its Neumann series with
    ``num_cayley_neumann_terms`` terms (``use_cayley_neumann``). ``coft`` keeps each ``Q`` within Frobenius norm
    ``eps / sqrt(r)``; ``block_share`` uses one block for all ``r``; ``module_dropout`` replaces that fraction of
    the blocks by the identity in training.

    ``fan_in_fan_out`` need not be set (OFT does not adapt transformers' ``Conv1D``); peftkit never rewrites it.
    """

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | set[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.OFT
        self.target_modules = as_set(self.target_modules)
        self.exclude_modules = as_set(self.exclude_modules)
        _check_modules_field("target_modules", self.target_modules)
        _check_modules_field("exclude_modules", self.exclude_modules)
        self._check_sizes()
        self._check_flags()
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern)

    def _check_sizes(self) -> None:
        check(is_int(self.r) and self.r >= 0, "r", self.r, "allowed: an int >= 0 (0: derived from oft_block_size)")
        check(is_int(self.oft_block_size) and self.oft_block_size >= 0, "oft_block_size", self.oft_block_size,
              "allowed: an int >= 0 (0: derived from r)")
        check(not (self.r == 0 and self.oft_block_size == 0), "r", self.r,
              f"Either `r` or `oft_block_size` must be non-zero (oft_block_size = {self.oft_block_size}); set one "
              "of them")
        check((self.r != 0) ^ (self.oft_block_size != 0), "r", self.r,
              f"You can only specify either r ({self.r}) or oft_block_size ({self.oft_block_size}), but not both "
              "simultaneously, because r x oft_block_size == in_features; set the other one to 0")
        check(is_int(self.num_cayley_neumann_terms) and self.num_cayley_neumann_terms >= 0,
              "num_cayley_neumann_terms", self.num_cayley_neumann_terms, "allowed: an int >= 0")

    def _check_flags(self) -> None:
        check(is_number(self.module_dropout) and 0 <= self.module_dropout <= 1, "module_dropout", self.module_dropout,
              "allowed: a float with 0 <= module_dropout <= 1")
        check(is_number(self.eps) and self.eps >= 0, "eps", self.eps, "allowed: a number >= 0")
        check(self.bias in _BIAS, "bias", self.bias, f"allowed: one of {list(_BIAS)}")
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """The reference's checks of a loaded config: adapters saved before PEFT 0.14 (no ``oft_block_size``) have
        another format and are refused; Cayley-Neumann adapters saved before PEFT 0.18 used another series (warns)."""
        if "oft_block_size" not in kwargs:
            raise ValueError(
                "OFT has been updated since PEFT 0.14.0. Your trained adapter weights are incompatible "
                "with the latest version of OFT. Please retrain your adapter weights with newer PEFT versions. "
                "Alternatively, downgrade PEFT to version 0.13.0 to use the old adapter weights."
            )
        if kwargs.get("use_cayley_neumann", False) and _version_below(kwargs.get("peft_version"), "0.18.0"):
            warnings.warn(
                "The cayley-neumann parameterization has been slightly changed to be more numerically stable in "
                "PEFT 0.18.0. Please retrain your adapter weights with newer PEFT versions. Alternatively, "
                "downgrade PEFT to version 0.17.0 to use the old parameterization.", PeftWarning, stacklevel=2)
        return super().check_kwargs(**kwargs)


def _version_below(version: object, minimum: str) -> bool:
    """Is the ``peft_version`` string (``"0.17.1"``, ``"0.21.2@peftkit-..."``; None: older than 0.18) below
    ``minimum``? An unparsable version counts as below, as a missing one."""
    if not isinstance(version, str):
        return True
    try:
        return Version(version.partition("@")[0]) < Version(minimum)
    except InvalidVersion:
        return True
