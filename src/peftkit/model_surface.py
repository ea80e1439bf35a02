"""What tools that duck-type transformers models read from a ``PeftModel`` (``transformers.Trainer``, TRL).

transformers recognises the reference's ``PeftModel`` by ``isinstance`` and then inspects the wrapped model; for any
other wrapper it inspects the wrapper itself. These helpers make that inspection see what it would see through the
reference:

* ``inspect.signature(peft_model.forward)`` is the wrapped model's forward signature (``Trainer`` keeps the dataset
  columns named there), plus ``adapter_names``;
* ``inspect.signature(type(peft_model).forward)`` declares the task's label inputs (``transformers.utils.find_labels``
  reads the *class*, so ``Trainer.label_names`` and ``eval_loss`` work);
* a parameter reachable under several names (tied input/output embeddings) appears once in ``state_dict()``, under
  its first name, so the safetensors writer ``Trainer`` uses for non-transformers models does not fail on shared
  memory; ``load_state_dict`` accepts such a state dict;
* input embeddings can be made to output tensors that require grad (needed by re-entrant gradient checkpointing with
  a frozen base).
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from .module_utils import model_embedding

_KW = inspect.Parameter.KEYWORD_ONLY


def _copy_function(func: types.FunctionType) -> types.FunctionType:
    """A new function object running ``func``'s code (so it can carry its own ``__signature__``)."""
    new = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    new.__kwdefaults__ = func.__kwdefaults__
    new.__qualname__, new.__module__, new.__doc__ = func.__qualname__, func.__module__, func.__doc__
    new.__dict__.update({k: v for k, v in func.__dict__.items() if k != "__signature__"})
    return new


def _insert_keyword_only(sig: inspect.Signature, names: Sequence[str]) -> inspect.Signature:
    """``sig`` with keyword-only parameters ``names`` (default None) added before ``**kwargs`` (existing ones kept)."""
    params = list(sig.parameters.values())
    new = [inspect.Parameter(n, _KW, default=None) for n in names if n not in sig.parameters]
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return sig.replace(parameters=[*params[:at], *new, *params[at:]])


def declare_labels(func: types.FunctionType, label_names: Sequence[str]) -> types.FunctionType:
    """A copy of a ``PeftModel`` class's ``forward`` whose signature declares ``label_names`` (keyword-only).

    ``func(self, *args, adapter_names=None, **kwargs)`` accepts labels through ``**kwargs`` already; the declaration
    only tells ``find_labels`` (which inspects the class, not the instance) what the task's labels are called.
    """
    plain = getattr(func, "_peftkit_plain", func)
    sig = inspect.signature(plain)
    params = list(sig.parameters.values())
    at = next(i for i, p in enumerate(params) if p.kind in (_KW, inspect.Parameter.VAR_KEYWORD))
    labels = [inspect.Parameter(n, _KW, default=None) for n in label_names]
    new = _copy_function(plain)
    new.__signature__ = sig.replace(parameters=[*params[:at], *labels, *params[at:]])  # type: ignore[attr-defined]
    new._peftkit_plain = plain  # type: ignore[attr-defined]
    return new


def bind_forward(model: nn.Module, inner: nn.Module) -> WeakMethod | None:
    """``type(model).forward`` bound to ``model``, carrying the signature of ``inner.forward`` plus ``adapter_names``.

    Stored as ``model.forward`` (an instance attribute, as TRL and accelerate also patch ``forward``); it holds
    ``model`` weakly (see :class:`WeakMethod`). None when ``inner``'s signature cannot be read.
    """
    func = type(model).forward
    try:
        inner_sig = inspect.signature(inner.forward)
    except (TypeError, ValueError):
        return None
    plain = getattr(func, "_peftkit_plain", func)
    return WeakMethod(plain, model, _insert_keyword_only(inner_sig, ["adapter_names"]))


class WeakMethod:
    """``function`` bound to ``model`` like a method (``__func__``, ``__self__``), holding ``model`` weakly.

    Meant to be stored on ``model`` itself: a bound method there would refer back to its module strongly and make
    every such model a reference cycle, freed only when the cyclic garbage collector next runs (later, and at a cost
    paid by whatever code runs then) instead of as soon as its last reference goes. ``signature`` (without the
    model's parameter; by default the function's own minus its first) is what ``inspect.signature`` reports. Copies with ``copy.deepcopy`` and pickles (bound to the
    copy)."""

    def __init__(self, function: Callable[..., Any], model: nn.Module,
                 signature: inspect.Signature | None = None) -> None:
        functools.update_wrapper(self, function)
        self.__dict__.pop("__signature__", None)
        self.__func__ = function
        self._model = weakref.ref(model)
        if signature is None:  # as for a bound method: the function's own signature without its first parameter
            own = inspect.signature(function)
            signature = own.replace(parameters=list(own.parameters.values())[1:])
        self.__signature__ = signature

    @property
    def __self__(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise ReferenceError(f"the model {self.__func__.__name__} was bound to no longer exists")
        return model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return (WeakMethod, (self.__func__, self.__self__, self.__signature__))

    def __repr__(self) -> str:
        return f"<peftkit {self.__func__.__name__} bound to {type(self.__self__).__name__}>"


# ---------------------------------------------------------------------------------------------------- tied weights
def tied_aliases(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) under which an already-listed parameter appears again (tied weights)."""
    seen: set[int] = set()
    aliases: list[str] = []
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.append(name)
        seen.add(id(param))
    return aliases


def drop_tied_aliases(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook: keep each tied parameter once, under its first name."""
    for alias in tied_aliases(module):
        state_dict.pop(prefix + alias, None)


def forgive_tied_aliases(module: nn.Module, incompatible_keys: _IncompatibleKeys) -> None:
    """``load_state_dict`` post-hook: a tied parameter's alias is not missing (it was loaded under its first name)."""
    aliases = tied_aliases(module)
    if not aliases:
        return
    kept = [k for k in incompatible_keys.missing_keys if not any(k == a or k.endswith("." + a) for a in aliases)]
    incompatible_keys.missing_keys[:] = kept


# ---------------------------------------------------------------------------------------------------- input grads
def _make_output_require_grad(module: nn.Module, args: Any, output: Any) -> None:
    if hasattr(output, "requires_grad_"):
        output.requires_grad_(True)


def enable_input_grads(model: nn.Module) -> bool:
    """Make ``model``'s input embeddings output tensors that require grad, once (True if a hook is in place).

    Re-entrant gradient checkpointing drops the gradients of a checkpointed block whose inputs do not require grad,
    which is the case for every block of a frozen base model; the hook gives the first block such an input.
    """
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None) is not None:
        return True
    if hasattr(model, "enable_input_require_grads"):
        try:
            model.enable_input_require_grads()
        except (NotImplementedError, AttributeError):
            pass
        else:
            return bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))
    embeddings = model_embedding(model, "get_input_embeddings")
    if embeddings is None:
        return False
    model._require_grads_hooks = [embeddings.register_forward_hook(_make_output_require_grad)]
    return True
