"""Field checks that several methods' configs share (the reference's rules, written once); each raises
``ConfigError`` naming the field, the value and what is allowed."""

from __future__ import annotations

from typing import Any

from .config import check, is_int

#: the reference's message where ``layers_pattern`` is given without ``layers_to_transform``
PATTERN_NEEDS_LAYERS = "layers_pattern is only allowed together with layers_to_transform"


def check_layer_selection(target_modules: Any, layers_to_transform: Any, layers_pattern: Any, *,
                          str_targets: bool = False, pattern_needs_layers: bool = True,
                          pattern_message: str = PATTERN_NEEDS_LAYERS) -> None:
    """``layers_to_transform``: None, an int or a list of ints. With ``str_targets``, neither it nor
    ``layers_pattern`` may come with a str (regex) ``target_modules``. With ``pattern_needs_layers``, a non-empty
    ``layers_pattern`` needs ``layers_to_transform`` (an empty one, ``[]`` or ``""``, means none, as in the
    reference); ``pattern_message`` is the method's wording of that rule."""
    ltt = layers_to_transform
    check(ltt is None or is_int(ltt) or (isinstance(ltt, (list, tuple)) and all(is_int(i) for i in ltt)),
          "layers_to_transform", ltt, "allowed: None, an int or a list of ints")
    if str_targets and isinstance(target_modules, str):
        check(ltt is None, "layers_to_transform", ltt,
              "layers_to_transform cannot be used when target_modules is a str; use a list of module names")
        check(layers_pattern is None, "layers_pattern", layers_pattern,
              "layers_pattern cannot be used when target_modules is a str; use a list of module names")
    if pattern_needs_layers:
        check(not (layers_pattern and ltt is None), "layers_pattern", layers_pattern, pattern_message)
