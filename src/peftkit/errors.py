"""Typed exceptions. Each subclasses the builtin the reference raises, so existing ``except`` clauses still work.

Messages name the field or object, the offending value and what would be allowed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PeftError(Exception):
    """Base class of every peftkit error."""


class PeftWarning(UserWarning):
    """Category of every warning peftkit emits."""


class ConfigError(PeftError, ValueError):
    """A config field has a value that is not allowed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is not allowed; {allowed}")


class NoMatchingPeftModuleError(PeftError, ValueError):
    """``target_modules`` (or another selector) matched no module of the model."""


class UnsupportedModuleError(PeftError, TypeError):
    """A targeted module has a type the method has no layer for."""


class AdapterNotFoundError(PeftError, ValueError, KeyError):
    """An adapter name that the model does not hold."""

    def __init__(self, name: object, available: Iterable[str]) -> None:
        avail = sorted(available)
        self.name, self.available = name, avail
        super().__init__(f"adapter {name!r} does not exist; available adapters: {avail}")

    __str__ = ValueError.__str__


class AdapterExistsError(PeftError, ValueError):
    """An adapter name that is already taken."""


class AdapterLoadError(PeftError, ValueError):
    """An adapter could not be loaded (missing or corrupt files, mismatched keys or shapes)."""


class ShapeMismatchError(AdapterLoadError):
    """A checkpoint tensor's shape differs from the shape of the parameter it loads into."""


class MergeError(PeftError, ValueError):
    """A merge that cannot be done (NaN/inf in the merged weights, a merged adapter deleted, ...)."""


def closest_names(query: str, names: Iterable[str], n: int = 5) -> list[str]:
    """The up to ``n`` names most similar to ``query``, compared on whole names and on their last components."""
    names = list(dict.fromkeys(names))
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    pool = list(dict.fromkeys([*sorted(leaves), *names]))
    hits = difflib.get_close_matches(query, pool, n=n, cutoff=0.4)
    if not hits:
        hits = difflib.get_close_matches(query.rsplit(".", 1)[-1], pool, n=n, cutoff=0.3)
    return hits
