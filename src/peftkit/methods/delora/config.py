"""``DeloraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import PeftConfig, check, is_int, is_number
from ...types import PeftType
from ..hra.config import check_shared_adapter_fields

#: the values of ``bias`` (``"delora_only"``, or any ``"<name>_only"``, trains the biases of the adapted layers)
DELORA_BIAS = ("none", "all", "delora_only")


@dataclass
class DeloraConfig(PeftConfig):
    """Configuration of a DeLoRA adapter (field names and defaults of the reference's ``DeloraConfig``).

    DeLoRA (https://huggingface.co/papers/2503.18225) decouples the angle of a low-rank update from its strength:
    for a targeted ``nn.Linear`` ``W: (out, in)`` with trained ``A: (r, in)``, ``B: (out, r)`` and a trained scalar
    ``λ`` (``delora_lambda``),
    ``ΔW = B · diag(λ / (r · ‖A_i‖ · ‖B^i‖)) · A · diag(‖W_:,j‖)``: each rank-1 component ``B^i A_i`` is normalised,
    so ``‖ΔW‖_F <= λ · max_j ‖W_:,j‖`` whatever ``A`` and ``B`` are (norms are clamped below at 1e-4). The column
    norms ``‖W_:,j‖`` of the base weight are frozen when the adapter is created and saved with it
    (``delora_w_norm``). ``init_weights=True`` zeroes ``B`` (identity at init); ``False`` draws it like ``A``
    (kaiming uniform). ``rank_pattern`` / ``lambda_pattern`` map module-name regexes to a per-layer ``r`` / ``λ``.
    ``module_dropout`` is, as in the reference's forward, dropout on the adapter's input.
    """

    r: int = 8
    delora_lambda: int = 15
    module_dropout: float = 0.0
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict | None = field(default_factory=dict)
    lambda_pattern: dict | None = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.DELORA
        # as the reference's tuner: any "<name>_only" trains the adapted layers' biases
        only = (self.bias,) if isinstance(self.bias, str) and self.bias.endswith("_only") else ()
        check_shared_adapter_fields(self, DELORA_BIAS + only)
        check(is_number(self.delora_lambda), "delora_lambda", self.delora_lambda,
              "allowed: a number (the initial bound of the update's strength)")
        check(is_number(self.module_dropout) and 0 <= self.module_dropout <= 1, "module_dropout",
              self.module_dropout, "allowed: a float with 0 <= module_dropout <= 1")
        check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "allowed: True or False")
        for name in ("rank_pattern", "lambda_pattern"):
            if getattr(self, name) is None:
                setattr(self, name, {})
            check(isinstance(getattr(self, name), dict), name, getattr(self, name),
                  "allowed: a dict {module-name regex: value}")
        for key, rank in self.rank_pattern.items():
            check(is_int(rank) and rank >= 1, f"rank_pattern[{key!r}]", rank, "allowed: an int >= 1")
        for key, value in self.lambda_pattern.items():
            check(is_number(value), f"lambda_pattern[{key!r}]", value, "allowed: a number")
