"""Pure name matching: which module names a config selects. No torch, no model mutation."""

from __future__ import annotations

import re
from collections.abc import Iterable

#: ``target_modules`` shorthand for every linear layer except the output head.
ALL_LINEAR = "all-linear"


def matches(selector: str | Iterable[str] | None, name: str) -> bool:
    """Does ``selector`` select the module called ``name``?

    A str is a regex that must ``re.fullmatch`` the whole name; a collection matches a name equal to one entry or
    ending with ``"." + entry``. None selects nothing.
    """
    if selector is None:
        return False
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in selector)


def inside_any(name: str, module_names: Iterable[str]) -> bool:
    """True when ``name`` is one of ``module_names`` (by exact or suffix match) or lies inside one of them."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in module_names)


def layer_index(name: str, layers_pattern: str | Iterable[str] | None) -> int | None:
    """Index of the layer holding module ``name``.

    Without ``layers_pattern`` it is the first numeric path segment after the first segment
    (``model.layers.3.self_attn.q_proj`` -> 3); with it, the number right after a segment named by the pattern
    (``layers``, ``h``, ``block``, ...). None when the name has no such segment.
    """
    parts = name.split(".")
    if not layers_pattern:
        for i, part in enumerate(parts):
            if i > 0 and part.isdigit():
                return int(part)
        return None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    for i in range(len(parts) - 1):
        if parts[i + 1].isdigit() and any(re.fullmatch(p, parts[i]) for p in patterns):
            return int(parts[i + 1])
    return None


def in_layers(name: str, layers_to_transform: int | Iterable[int] | None, layers_pattern: object) -> bool:
    """The ``layers_to_transform`` filter: True when no filter is set or the module's layer index is selected."""
    if layers_to_transform is None:
        return True
    wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
    if not wanted:
        return True
    index = layer_index(name, layers_pattern)  # type: ignore[arg-type]
    return index is not None and index in wanted


def pattern_value(patterns: dict[str, object], name: str, default: object) -> object:
    """Value of the first key of ``patterns`` that matches ``name`` as ``(.*\\.)?(key)$`` (rank/alpha patterns)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
