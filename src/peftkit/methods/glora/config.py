"""``GloraConfig``: the reference's fields and defaults, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, as_set, check, is_int
from ...types import PeftType

#: allowed parameterisations of each GLoRA support tensor (the reference's sets)
GLORA_A_B = ("lora", "vector", "constant", "none")
GLORA_C = ("lora", "vector", "none")
GLORA_D_E = ("vector", "constant", "none")
#: the values of ``bias`` (any ``"<name>_only"``, e.g. ``"glora_only"``, trains the biases of the adapted layers)
GLORA_BIAS = ("none", "all", "glora_only")


@dataclass
class GloraConfig(PeftConfig):
    """Configuration of a GLoRA adapter (field names and defaults of the reference's ``GloraConfig``).

    GLoRA (generalised LoRA, https://huggingface.co/papers/2306.07967) adapts a frozen ``nn.Linear`` with
    ``W: (out, in)``, ``b: (out,)`` as ``W' = W + W ⊙ A + B`` and ``b' = b + b ⊙ D + E + W C``. Each support tensor
    is parameterised by its ``config_*`` field:

    - ``"lora"``: ``Xd @ Xu`` with ``Xd: (out, r)``, ``Xu: (r, in)`` (for ``C``: ``(in, r)`` and ``(r, 1)``);
    - ``"vector"``: ``X: (out, 1)`` broadcast over the inputs (``C``: ``(in, 1)``; ``D``/``E``: ``(out,)``);
    - ``"constant"``: one scalar ``X: (1,)``;
    - ``"none"``: a frozen zero buffer ``zeros`` (saved, as the reference saves it).

    ``C``, ``D`` and ``E`` are trained only on layers with a bias (elsewhere zero buffers). ``init_weights=True``
    zeroes ``Xd`` / vectors / scalars (identity at init); ``False`` draws them (kaiming uniform; scalars
    ``N(0, 0.02²)``).
    """

    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    bias: str = "none"
    modules_to_save: list[str] | None = None
    config_A_B: str = "lora"
    config_C: str = "lora"
    config_D_E: str = "constant"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.GLORA
        self.target_modules = as_set(self.target_modules)
        check(is_int(self.r) and self.r >= 1, "r", self.r, "allowed: an int >= 1")
        # as the reference's tuner: any "<name>_only" trains the adapted layers' biases
        only = (self.bias,) if isinstance(self.bias, str) and self.bias.endswith("_only") else ()
        check(self.bias in GLORA_BIAS + only, "bias", self.bias, f"allowed: {list(GLORA_BIAS)}")
        for name, allowed in (("config_A_B", GLORA_A_B), ("config_C", GLORA_C), ("config_D_E", GLORA_D_E)):
            value = getattr(self, name)
            check(isinstance(value, str) and value in allowed, name, value, f"allowed: {list(allowed)}")
        check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "allowed: True or False")
