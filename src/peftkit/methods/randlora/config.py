"""``RandLoraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...types import PeftType

#: the values of ``bias`` (the reference's: ``"randlora_only"`` trains the biases of the adapted layers)
RANDLORA_BIAS = ("none", "all", "randlora_only")


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_layer_indices(value: object) -> bool:
    return value is None or is_int(value) or (isinstance(value, (list, tuple)) and all(is_int(i) for i in value))


#: ``(field, test, what is allowed)`` checked in order by ``RandLoraConfig.__post_init__``
_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("r", lambda v: is_int(v) and v >= 1, "allowed: an int >= 1 (the rank of each random basis)"),
    ("projection_prng_key", is_int, "allowed: an int (the seed of the shared random bases)"),
    *((name, _is_bool, "allowed: True or False")
      for name in ("save_projection", "sparse", "very_sparse", "fan_in_fan_out", "init_weights")),
    ("randlora_dropout", lambda v: is_number(v) and 0 <= v < 1, "allowed: a float with 0 <= randlora_dropout < 1"),
    ("randlora_alpha", is_number, "allowed: a number (typically 20 * r)"),
    ("bias", lambda v: v in RANDLORA_BIAS, f"allowed: {list(RANDLORA_BIAS)}"),
    ("layers_to_transform", _is_layer_indices, "allowed: None, an int or a list of ints"),
)


@dataclass
class RandLoraConfig(PeftConfig):
    """Configuration of a RandLoRA adapter (field names and defaults of the reference's ``RandLoraConfig``).

    RandLoRA (https://huggingface.co/papers/2502.00987) adapts ``W: (out, in)`` with a full-rank sum of
    ``nb = ceil(min(in, out) / r)`` frozen random rank-``r`` bases shared by every adapted layer of the model:
    ``randlora_A: (r, 1, min_dim)`` and ``randlora_B: (max_dim, NB, r)`` (drawn from ``projection_prng_key``; dense
    kaiming-uniform, or ternary with ``sparse`` / ``very_sparse``; saved when ``save_projection``). Per layer only
    ``randlora_lambda: (r, nb)`` (zeros at init: identity) and ``randlora_gamma: (nb, min(in, out))`` train; the
    update is scaled by ``randlora_alpha / r``. Linear and GPT-2 ``Conv1D`` layers.
    """

    r: int = 32
    target_modules: list[str] | set[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: int = 640
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.RANDLORA
        self.target_modules = as_set(self.target_modules)
        for name, ok, allowed in _CHECKS:
            check(ok(getattr(self, name)), name, getattr(self, name), allowed)
        check(not (self.layers_pattern and self.layers_to_transform is None), "layers_pattern", self.layers_pattern,
              "layers_pattern is only allowed together with layers_to_transform")
