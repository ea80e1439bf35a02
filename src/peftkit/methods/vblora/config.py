"""``VBLoRAConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int, is_number
from ...config_checks import check_layer_selection
from ...types import PeftType

#: ``bias`` values: which biases train besides the adapter
VBLORA_BIAS = ("none", "all", "vblora_only")


@dataclass
class VBLoRAConfig(PeftConfig):
    """Configuration of a VB-LoRA adapter (field names and defaults of the reference's ``VBLoRAConfig``).

    VB-LoRA (https://huggingface.co/papers/2405.15179) builds LoRA factors ``A: (r, in)`` and ``B: (out, r)`` of a
    linear ``W: (out, in)`` from one vector bank ``(num_vectors, vector_length)`` shared by every adapted layer of
    the model: each ``vector_length`` slice of a row of ``A`` (and of a column of ``B``) is the softmax-weighted
    sum of the ``topk`` bank vectors with the largest logits, ``vblora_logits_A: (r, in / L, num_vectors)`` and
    ``vblora_logits_B: (out / L, r, num_vectors)``; ``ΔW = B A`` (no scaling). ``in`` and ``out`` must be
    divisible by ``vector_length``. The bank is drawn from ``U(-init_vector_bank_bound, init_vector_bank_bound)``
    and the logits from ``N(0, init_logits_std²)``, so a fresh adapter is not the identity.
    ``save_only_topk_weights`` saves the top-k indices and the first ``topk - 1`` softmax weights instead of the
    logits (for merging or inference only; such an adapter cannot be trained further).
    """

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.VBLORA
        self.target_modules = as_set(self.target_modules)
        self.exclude_modules = as_set(self.exclude_modules)
        for name in ("r", "num_vectors", "vector_length", "topk"):
            value = getattr(self, name)
            check(is_int(value) and value >= 1, name, value, "allowed: a positive int")
        check(self.topk <= self.num_vectors, "topk", self.topk,
              f"allowed: an int <= num_vectors ({self.num_vectors}): top-k picks among the bank's vectors")
        check(is_number(self.vblora_dropout) and 0 <= self.vblora_dropout <= 1, "vblora_dropout", self.vblora_dropout,
              "allowed: a float with 0 <= vblora_dropout <= 1")
        check(self.bias in VBLORA_BIAS, "bias", self.bias, f"allowed: one of {list(VBLORA_BIAS)}")
        for name in ("save_only_topk_weights", "fan_in_fan_out"):
            check(isinstance(getattr(self, name), bool), name, getattr(self, name), "allowed: True or False")
        for name in ("init_vector_bank_bound", "init_logits_std"):
            value = getattr(self, name)
            check(is_number(value) and value >= 0, name, value, "allowed: a float >= 0")
        self._check_layers()

    def _check_layers(self) -> None:
        check_layer_selection(self.target_modules, self.layers_to_transform, self.layers_pattern,
                              pattern_message="When `layers_pattern` is specified, `layers_to_transform` must also "
                              "be specified.")
