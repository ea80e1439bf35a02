"""PiSSA / OLoRA -> plain LoRA, for ``save_pretrained(path_initial_model_for_weight_conversion=...)``.

PiSSA and OLoRA replace the base weight by ``W_res = W - s * B0 @ A0``. After training to ``A, B`` the model
computes ``W_res + s * B @ A = W + s * (B @ A - B0 @ A0) = W + s * [B | -B0] @ [A ; A0]``, a LoRA of rank ``2r``
on the ORIGINAL weight ``W``. Keeping the same scaling ``s`` at rank ``2r`` needs ``alpha * 2`` (``alpha * sqrt(2)``
under rsLoRA, whose scaling is ``alpha / sqrt(r)``).
"""

from __future__ import annotations

import math
import warnings

import torch

from ...config import PeftConfig
from ...errors import AdapterLoadError, ConfigError, PeftWarning
from ...serialization.files import load_peft_weights
from .config import LoraConfig


def convert_initial_weights(config: PeftConfig, tensors: dict[str, torch.Tensor], initial_path: str
                            ) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config and tensors of the plain rank-``2r`` LoRA equivalent to the trained adapter ``tensors``
    (file keys), given the directory ``initial_path`` holding the same adapter saved right after its
    PiSSA/OLoRA initialisation. Tensors other than ``lora_A``/``lora_B`` (``modules_to_save``) are kept as is."""
    assert isinstance(config, LoraConfig)
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError("use_rslora", True, "weight conversion is not supported together with rank_pattern or "
                          "alpha_pattern; allowed: use_rslora=False or no patterns")
    if config.use_dora or config.lora_bias:
        field = "use_dora" if config.use_dora else "lora_bias"
        raise ConfigError(field, True, f"weight conversion to a plain LoRA is not possible with {field}=True")
    _warn_unless_weight_init(config)
    try:
        initial = load_peft_weights(initial_path)
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot read the initial adapter at {initial_path!r}: {exc}") from exc
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        is_A, is_B = "lora_A" in parts, "lora_B" in parts
        if not (is_A or is_B):
            converted[key] = tensor
            continue
        if key not in initial or initial[key].shape != tensor.shape:
            found = None if key not in initial else tuple(initial[key].shape)
            raise AdapterLoadError(f"the initial adapter at {initial_path!r} has no tensor {key!r} of shape "
                                   f"{tuple(tensor.shape)} (found {found}); save it with save_pretrained right "
                                   "after get_peft_model")
        start = initial[key].to(tensor.device, tensor.dtype)
        converted[key] = torch.cat([tensor, start], dim=0) if is_A else torch.cat([tensor, -start], dim=1)
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    new_config = config.copy(
        init_lora_weights=True,
        r=config.r * 2,
        lora_alpha=config.lora_alpha * alpha_factor,
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: 2 * v for k, v in (config.alpha_pattern or {}).items()},
    )
    return new_config, converted


def _warn_unless_weight_init(config: LoraConfig) -> None:
    """As the reference: the conversion is meant for PiSSA / OLoRA (and CorDA / LoRA-GA) adapters, whose
    initialisation changed the base weight; warn for other initialisations (``True``, whose ``B0 = 0``, is fine)."""
    init = str(config.init_lora_weights).lower()
    if not any(init.startswith(prefix) for prefix in ("pissa", "corda", "olora", "lora_ga", "true")):
        warnings.warn(f"path_initial_model_for_weight_conversion is meant for PiSSA/CorDA/OLoRA/LoRA-GA adapters; this "
                      f"one was initialised with init_lora_weights={config.init_lora_weights!r}, which left the base "
                      "weight unchanged, so there is nothing to convert", PeftWarning, stacklevel=5)
