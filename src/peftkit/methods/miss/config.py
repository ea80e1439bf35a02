"""``MissConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, check, is_int, is_number
from ...types import PeftType
from ..hra.config import check_shared_adapter_fields


@dataclass
class MissConfig(PeftConfig):
    """Configuration of a MiSS adapter (formerly Bone; field names and defaults of the reference's ``MissConfig``).

    For a targeted ``W: (out, in)`` (``nn.Linear``), by ``init_weights``:

    - ``True`` (MiSS "balance", zeros) / ``False`` (random): ``miss_block: (r, out)`` is shared by every ``r``-wide
      column shard of ``W``: ``ΔW[o, j] = miss_block[j mod r, o]``, i.e. ``y = base(x) + (Σ_shards x_shard) @
      miss_block`` (an ``in`` not divisible by ``r`` pads ``x`` with zeros).
    - ``"bat"`` (block affine transformation): ``miss_block: (out/r, r, r)``; each ``r×r`` block ``W_ij`` of ``W``
      becomes ``W_ij (I + B_i) + B_i`` (``in`` and ``out`` divisible by ``r``).
    - ``"mini"``: ``miss_block: (r, mini_r)``, repeated ``out / mini_r`` times along ``out`` (``out`` divisible by
      ``mini_r``), then as the default.

    Every variant starts at zero (identity) with ``init_weights`` true-ish; ``miss_dropout`` drops the input of the
    shard sum (not used by ``"bat"``).
    """

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.MISS
        # the reference's rules (no check of layers_pattern without layers_to_transform, unlike HRA)
        check_shared_adapter_fields(self, ("none", "all", "miss_only", "MiSS_only"), pattern_needs_layers=False)
        check(is_number(self.miss_dropout) and 0 <= self.miss_dropout <= 1, "miss_dropout", self.miss_dropout,
              "allowed: a float with 0 <= miss_dropout <= 1")
        check(is_int(self.mini_r) and self.mini_r >= 1, "mini_r", self.mini_r, "allowed: an int >= 1")
        check(isinstance(self.init_weights, bool) or self.init_weights in ("bat", "mini"), "init_weights",
              self.init_weights, "allowed: True (MiSS), False (random MiSS), 'bat' or 'mini'")
