"""``LilyConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...config_checks import check_layer_selection
from ...types import PeftType


@dataclass
class LilyConfig(PeftConfig):
    """Configuration of a Lily adapter (low-rank interconnected adaptation across layers,
    https://arxiv.org/abs/2407.09946; field names and defaults of the reference's ``LilyConfig``).

    Each adapted ``W: (out, in)`` gets ``ΔW x = scaling · Σ_e p_e B_eᵀ (A x)`` with a low-rank projector
    ``lily_A: (r, in)``, ``num_B`` expert projectors ``lily_B: (num_B · r, out)`` (``B_e = lily_B[e·r:(e+1)·r]``)
    and a router ``lily_router: (num_B, r)`` whose softmax over ``A x``, averaged over every token of the batch,
    gives the weights ``p``. Within each group of adapted layers with the same target name and weight shape,
    ``stride_A`` consecutive layers share one ``lily_A`` and all share one ``lily_B``. ``init_weights=True`` zeroes
    ``lily_B`` (identity at init). Lily does not merge (the update depends on the batch).
    """

    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LILY
        self.target_modules = as_set(self.target_modules)
        self.exclude_modules = as_set(self.exclude_modules)
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern,
                              pattern_message="When `layers_pattern` is specified, `layers_to_transform` must also "
                                              "be specified.")
        # the reference checks r only when it builds a layer (ValueError); here before anything is built
        check(is_int(self.r) and self.r >= 1, "r", self.r, "allowed: an int >= 1")
        check(is_int(self.stride_A) and self.stride_A >= 1, "stride_A", self.stride_A,
              "`stride_A` must be at least 1 (an int: how many consecutive layers share one A)")
        check(is_int(self.num_B) and self.num_B >= 2, "num_B", self.num_B,
              "`num_B` must be at least 2 for the router to be trained (an int)")
        check(is_number(self.scaling), "scaling", self.scaling, "allowed: a number")
        check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "allowed: True or False")
