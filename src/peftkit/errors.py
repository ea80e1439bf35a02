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


class PeftRuntimeWarning(PeftWarning, RuntimeWarning):
    """A :class:`PeftWarning` where the reference warns with ``RuntimeWarning`` (unused rank/alpha pattern keys)."""


class ConfigError(PeftError, ValueError):
    """A config field has a value that is not allowed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is not allowed; {allowed}")


class ConfigTypeError(ConfigError, TypeError):
    """A :class:`ConfigError` for a value of the wrong type (``target_modules=123``); also a ``TypeError``, which
    the reference raises (untyped) in these cases."""


class LayerReplicationError(ConfigError, IndexError):
    """A ``layer_replication`` range past the model's last layer: a :class:`ConfigError` and an ``IndexError``,
    which the reference raises there (indexing the layer list)."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """``target_modules`` (or another selector) matched no module of the model."""


class UnsupportedModuleError(PeftError, TypeError, ValueError):
    """A targeted module has a type the method has no layer for.

    Both builtins the reference raises here: ``ValueError`` (LoRA, IA3, AdaLoRA: "Target module ... is not
    supported") and ``TypeError`` (LoHa, LoKr; ``modules_to_save`` on a container)."""


class UnsupportedOperationError(PeftError, TypeError):
    """An operation the model's method does not have (``set_requires_grad`` on a prompt-learning adapter, as the
    reference's ``TypeError``; ``get_prompt`` on a model without prompt-learning adapters)."""


class NotPromptLearningError(UnsupportedOperationError, AttributeError):
    """A prompt-learning operation (``get_prompt``, ``get_prompt_embedding_to_save``) on a model without
    prompt-learning adapters: also an ``AttributeError``, which the reference raises there."""


class AdapterNotFoundError(PeftError, ValueError, KeyError):
    """An adapter name that the model does not hold."""

    def __init__(self, name: object, available: Iterable[str]) -> None:
        avail = sorted(available)
        self.name, self.available = name, avail
        super().__init__(f"adapter {name!r} does not exist; available adapters: {avail}")

    __str__ = ValueError.__str__


class AdapterExistsError(PeftError, ValueError):
    """An adapter name that is already taken."""


class AdapterConflictError(PeftError, ValueError):
    """Adapters that cannot be active together (e.g. two that each hold a ``modules_to_save`` copy of one module)."""


class AdapterLoadError(PeftError, ValueError):
    """An adapter could not be loaded (missing or corrupt files, mismatched keys or shapes)."""


class MissingPeftTypeError(AdapterLoadError, TypeError, KeyError):
    """A config (dict or ``adapter_config.json``) without ``peft_type``, loaded where the method must come from it.

    The reference raises ``TypeError`` from ``PeftConfig.from_pretrained`` and ``KeyError`` from
    ``get_peft_config`` / ``PeftModel.from_pretrained``; this error is both (and a ``ValueError``, as every load
    error here)."""

    __str__ = ValueError.__str__


class AdapterMismatchError(AdapterLoadError):
    """A directory's ``adapter_config.json`` and weights were written by different saves (the config saved with
    the weights differs in a field that gives them their meaning)."""


class ShapeMismatchError(AdapterLoadError, RuntimeError):
    """A checkpoint tensor's shape differs from the shape of the parameter it loads into (also a ``RuntimeError``,
    which the reference raises from ``load_state_dict``)."""


class MergeError(PeftError, ValueError):
    """A merge that cannot be done (NaN/inf in the merged weights, a merged adapter deleted, ...)."""


class UnmergeableMethodError(MergeError, NotImplementedError):
    """Merging an adapter whose method has no fixed weight update (Lily's batch-dependent router, the prompt
    methods); the reference raises ``NotImplementedError`` for such methods."""


class GroupedConvMergeError(MergeError, NotImplementedError):
    """Merging LoRA into a grouped convolution (``groups > 1``): the update ``B ∘ A`` mixes all input channels into
    every output, which a grouped kernel ``(out, in / groups, *k)`` cannot hold (the reference raises
    ``NotImplementedError``)."""


def closest_names(query: str, names: Iterable[str], n: int = 5) -> list[str]:
    """The up to ``n`` names most similar to ``query``, compared on whole names and on their last components."""
    names = list(dict.fromkeys(names))
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    pool = list(dict.fromkeys([*sorted(leaves), *names]))
    hits = difflib.get_close_matches(query, pool, n=n, cutoff=0.4)
    if not hits:
        hits = difflib.get_close_matches(query.rsplit(".", 1)[-1], pool, n=n, cutoff=0.3)
    return hits
