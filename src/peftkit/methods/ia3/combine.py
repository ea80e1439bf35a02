"""``add_weighted_adapter`` for (IA)³: the new adapter's vectors are ``Σ_i w_i · ia3_l[adapter_i]`` (linear only).

As in the reference, the new adapter's config is the first source's with ``target_modules`` and
``feedforward_modules`` the union of the sources' (``"(a)|(b)"`` for regex strings); all sources must use the same
kind (list or regex) for both. A layer some source lacks contributes nothing for that source. Every combined vector
is computed before the new adapter is injected, so a failure leaves the model unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...config import PeftConfig
from ...errors import ConfigError
from ...layers.modules_to_save import ModulesToSaveWrapper
from ..lora.combine import _check_modules_to_save, _copy_modules_to_save
from .layers import IA3Layer


def _union(values: list[Any], name: str) -> set[str] | str | None:
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise ConfigError(name, values, "allowed: the same kind (all lists or all regex strings) for every source")
    if all(v is None for v in values):
        return None
    if isinstance(values[0], str):
        return "|".join(f"({v})" for v in values)
    return set().union(*values)


def add_weighted_adapter(
    tuner: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
    combination_type: str = "svd", **_options: Any,
) -> None:
    """Add (IA)³ adapter ``adapter_name`` with vectors ``Σ_i weights[i] · ia3_l[adapters[i]]`` (added inactive).

    IA3 offers linear weighting only: ``combination_type`` may be ``"linear"`` (or the tuner's default ``"svd"``,
    which is read as linear); the SVD/TIES/DARE options are ignored.
    """
    if combination_type not in ("linear", "svd"):
        raise ConfigError("combination_type", combination_type, "allowed for IA3: 'linear' (weighted sum of vectors)")
    configs: list[PeftConfig] = [tuner.peft_config[a] for a in adapters]
    targets = _union([c.target_modules for c in configs], "target_modules")  # type: ignore[attr-defined]
    feedforward = _union([c.feedforward_modules for c in configs], "feedforward_modules")  # type: ignore[attr-defined]
    wrappers = [(n, m) for n, m in tuner.adapter_modules() if isinstance(m, ModulesToSaveWrapper)]
    _check_modules_to_save(wrappers, adapters)
    saved = list(dict.fromkeys(m for c in configs for m in (c.modules_to_save or [])))
    combined: dict[int, torch.Tensor] = {}
    layers = [m for _, m in tuner.adapter_modules() if isinstance(m, IA3Layer)]
    for layer in layers:
        held = [(a, w) for a, w in zip(adapters, weights) if a in layer.ia3_l]
        if held:
            combined[id(layer)] = sum(layer.ia3_l[a].detach() * w for a, w in held)  # type: ignore[assignment]
    config = configs[0].copy(target_modules=targets, feedforward_modules=feedforward, modules_to_save=saved or None)
    tuner.inject_adapter(config, adapter_name)
    with torch.no_grad():
        for layer in layers:
            if adapter_name in layer.ia3_l:
                vec = combined.get(id(layer))
                layer.ia3_l[adapter_name].copy_(vec if vec is not None else torch.zeros_like(layer.ia3_l[adapter_name]))
    _copy_modules_to_save(wrappers, adapters, adapter_name)
