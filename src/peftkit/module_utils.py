"""Cheap building blocks for code that touches every module of a model (injection, loading, trainability).

Injecting an adapter into a model creates about ten ``nn.Module`` objects per adapted layer and walks the whole
module tree several times; on a 98M-parameter Llama that work, not the tensors, is most of ``from_pretrained``.
These helpers do the same things with fewer Python operations:

- :func:`walk_modules`: ``named_modules()`` as one iterative walk (no generator frame per level per module);
- :func:`new_module`: an empty container module (``nn.ModuleDict``, ``nn.ParameterDict``, ``nn.Identity``) without
  running ``nn.Module.__init__``'s attribute-by-attribute set-up, from a blueprint of what that ``__init__`` left
  on a real instance (so it follows the installed torch version, and falls back to the constructor when the
  blueprint is not plain);
- :func:`add_child`: register a child module without ``add_module``'s per-call checks when nobody watches
  registrations;
- :func:`gc_paused`: no cyclic garbage collection while many long-lived objects are created at once.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn
from torch.nn.modules import module as torch_module

M = TypeVar("M", bound=nn.Module)


def walk_modules(model: nn.Module, leaves: tuple[type, ...] = ()) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` (same pre-order, each module once, dotted names) except that modules of the
    ``leaves`` types are yielded but not descended into."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        if leaves and isinstance(module, leaves):
            continue
        children = module._modules
        if children:
            prefix = path + "." if path else ""
            stack.extend(reversed([(prefix + name, child) for name, child in children.items() if child is not None]))


class _Blueprint:
    """What ``cls()`` leaves in a fresh instance's ``__dict__``, when that is only flags and empty containers."""

    def __init__(self, cls: type[nn.Module]) -> None:
        self.cls = cls
        state = vars(cls())
        containers = (dict, set, OrderedDict)
        self.plain = all(v is None or type(v) is bool or (type(v) in containers and not v) for v in state.values())
        self.flags = {k: v for k, v in state.items() if v is None or type(v) is bool}
        self.keys = tuple(k for k in state if k not in self.flags)
        self.types = tuple(type(state[k]) for k in self.keys)

    def fill(self, module: nn.Module) -> None:
        """Set the blueprint's state on ``module``: the flags, and a fresh empty container for each container."""
        attrs = module.__dict__
        attrs.update(self.flags)
        attrs.update(zip(self.keys, map(type.__call__, self.types)))


_BLUEPRINTS: dict[type, _Blueprint] = {}


def _blueprint(cls: type[nn.Module]) -> _Blueprint:
    blueprint = _BLUEPRINTS.get(cls)
    if blueprint is None:
        blueprint = _BLUEPRINTS[cls] = _Blueprint(cls)
    return blueprint


def new_module(cls: type[M]) -> M:
    """``cls()`` for a module class whose no-argument constructor only sets flags and empty containers (as
    ``nn.ModuleDict``, ``nn.ParameterDict`` and ``nn.Identity`` do): the same ``__dict__``, built ~2x faster."""
    blueprint = _blueprint(cls)
    if not blueprint.plain:
        return cls()
    module = cls.__new__(cls)
    blueprint.fill(module)
    return module


def init_module_state(module: nn.Module) -> None:
    """What ``nn.Module.__init__`` sets on ``module`` (hooks, parameter and child dicts, ``training``), for a
    subclass whose own ``__init__`` would call it; through ``nn.Module.__init__`` itself when the blueprint is not
    plain."""
    blueprint = _blueprint(nn.Module)
    if blueprint.plain:
        blueprint.fill(module)
    else:
        nn.Module.__init__(module)


_MODULE_TRAIN = nn.Module.train


def set_training(module: nn.Module, mode: bool) -> None:
    """``module.train(mode)`` for a subtree of plain torch containers and layers: the ``training`` flag is written
    directly on every module whose class keeps ``nn.Module.train``; a module that overrides ``train`` gets its own
    call (and handles its children)."""
    stack = [module]
    while stack:
        current = stack.pop()
        if type(current).train is not _MODULE_TRAIN:
            current.train(mode)
            continue
        current.__dict__["training"] = mode
        children = current._modules
        if children:
            stack.extend(child for child in children.values() if child is not None)


def parameter_grads(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """``(parameter, requires_grad)`` of every parameter of ``model`` (each once), in one walk."""
    seen: set[int] = set()
    out = []
    for _, module in walk_modules(model):
        for param in module._parameters.values():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                out.append((param, param.requires_grad))
    return out


def freeze(model: nn.Module) -> None:
    """``model.requires_grad_(False)`` in one walk, touching only parameters that require grad."""
    for param, grad in parameter_grads(model):
        if grad:
            param.requires_grad_(False)


def add_child(holder: nn.Module, name: str, child: nn.Module) -> None:
    """``holder[name] = child`` / ``holder.add_module(name, child)`` for a valid new ``name``, skipping
    ``add_module``'s checks unless global module-registration hooks are registered (then they run)."""
    if torch_module._global_module_registration_hooks or not name or "." in name:
        holder.add_module(name, child)  # hooks to run, or a name add_module must reject
    else:
        holder._modules[name] = child


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause cyclic garbage collection for the block (restored on exit, also on error). Building an adapter creates
    thousands of small long-lived containers; each 700 allocations would otherwise trigger a collection, and an
    occasional full one walks every object of the process (tens of milliseconds with transformers loaded)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def model_embedding(model: nn.Module, getter: str) -> nn.Module | None:
    """``model.<getter>()`` (``"get_input_embeddings"`` / ``"get_output_embeddings"``) when it is a module; None
    when the method is missing, returns something else or raises (transformers 5 raises ``NotImplementedError``
    for models without token embeddings: ConvNeXt, Wav2Vec2, CLIP)."""
    method = getattr(model, getter, None)
    try:
        module = method() if callable(method) else None
    except (AttributeError, NotImplementedError):
        return None
    return module if isinstance(module, nn.Module) else None
