"""``RoadConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int
from ...types import PeftType

#: RoAd variants and the number of angles (and of scales) each stores per output feature
ROAD_VARIANTS: dict[str, float] = {"road_1": 0.5, "road_2": 1.0, "road_4": 2.0}


@dataclass
class RoadConfig(PeftConfig):
    """Configuration of a RoAd adapter (field names and defaults of the reference's ``RoadConfig``).

    RoAd (https://huggingface.co/papers/2409.00119) rotates pairs of output features of a targeted ``nn.Linear``
    ``W: (out, in)`` by learned angles ``road_theta`` and scales them by learned ``road_alpha``:
    ``y' = y ⊙ (α cos θ) + rotate_half(y) ⊙ (α sin θ)`` where, within each group of ``group_size`` features,
    feature ``j`` pairs with feature ``j + group_size / 2``. Per layer both vectors have ``out / 2`` entries
    (``road_1``: one angle and scale per pair), ``out`` (``road_2``: one per feature) or ``2 * out`` (``road_4``:
    separate angles and scales for the two entries of each row of the 2x2 matrix). ``out`` must be divisible by
    ``group_size``. The reference's config has no ``exclude_modules``; neither has this one.
    """

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.ROAD
        self.target_modules = as_set(self.target_modules)
        check(self.variant in ROAD_VARIANTS, "variant", self.variant, f"allowed: {sorted(ROAD_VARIANTS)}")
        check(is_int(self.group_size) and self.group_size > 0 and self.group_size % 2 == 0, "group_size",
              self.group_size, "allowed: a positive even int (features pair within groups of this size)")
        check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "allowed: True or False")
