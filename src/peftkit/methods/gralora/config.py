"""``GraloraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...types import PeftType

#: ``bias`` values besides "<anything>_only" (the reference documents "gralora_only"; its tuner accepts any "_only")
GRALORA_BIAS = ("none", "all")


@dataclass
class GraloraConfig(PeftConfig):
    """Configuration of a GraLoRA adapter (field names and defaults of the reference's ``GraloraConfig``).

    GraLoRA (granular low-rank adaptation, https://huggingface.co/papers/2505.20355) splits a targeted
    ``W: (out, in)`` into ``k x k`` blocks (``k = gralora_k``; ``in`` and ``out`` divisible by ``k``) and gives block
    ``(j, n)`` (output block ``j``, input block ``n``) its own rank-``r / k`` update. Per layer it stores
    ``gralora_A: (k, in / k, r)`` and ``gralora_B: (k, r, out / k)``: ``ΔW[j, n] = (A[n][:, j] B[j][n])ᵀ`` where
    ``A[n][:, j]`` are columns ``j·r/k … (j+1)·r/k`` of ``A[n]`` and ``B[j][n]`` rows ``n·r/k …`` of ``B[j]``; the
    parameter count equals a rank-``r`` LoRA's while the update's rank reaches ``k·r``. ``hybrid_r > 0`` adds a plain
    LoRA ``gralora_B_general (out, hybrid_r) @ gralora_A_general (hybrid_r, in)``. Both parts are scaled by
    ``alpha / (r + hybrid_r)``. ``init_weights=True`` zeroes the ``B`` factors (identity at init); ``False`` draws them
    at random (the reference's testing init).
    """

    r: int = 32
    hybrid_r: int = 0
    target_modules: list[str] | set[str] | str | None = None
    alpha: int = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.GRALORA
        self.target_modules = as_set(self.target_modules)
        check(is_int(self.gralora_k) and self.gralora_k >= 1, "gralora_k", self.gralora_k, "allowed: an int >= 1")
        check(is_int(self.r) and self.r >= 1, "r", self.r, "allowed: an int >= 1 (and divisible by gralora_k)")
        check(self.r % self.gralora_k == 0, "r", self.r,
              f"r must be divisible by gralora_k={self.gralora_k} (each of the k x k blocks has rank r / gralora_k)")
        check(is_int(self.hybrid_r) and self.hybrid_r >= 0, "hybrid_r", self.hybrid_r, "allowed: an int >= 0")
        check(is_number(self.alpha), "alpha", self.alpha, "allowed: a number")
        check(is_number(self.gralora_dropout) and 0 <= self.gralora_dropout < 1, "gralora_dropout",
              self.gralora_dropout, "allowed: a float with 0 <= gralora_dropout < 1")
        for name in ("fan_in_fan_out", "init_weights"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        check(self.bias in GRALORA_BIAS or (isinstance(self.bias, str) and self.bias.endswith("_only")), "bias",
              self.bias, "allowed: 'none', 'all' or 'gralora_only' (the adapted layers' biases)")
        ltt = self.layers_to_transform
        check(ltt is None or is_int(ltt) or (isinstance(ltt, (list, tuple)) and all(is_int(i) for i in ltt)),
              "layers_to_transform", ltt, "allowed: None, an int or a list of ints")
