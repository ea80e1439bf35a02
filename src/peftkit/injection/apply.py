"""``apply_plan``: the only code that swaps modules of a user's model, and ``rollback`` to undo it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import PeftConfig
from ..layers.base import AdapterLayer
from ..layers.modules_to_save import ModulesToSaveWrapper
from ..registry import MethodSpec
from .plan import InjectionPlan

#: while loading: ``{data_ptr: tensor}`` of adapter tensors left uninitialised because a checkpoint fills them
_PENDING: ContextVar[dict[int, torch.Tensor] | None] = ContextVar("peftkit_pending_init", default=None)


@contextmanager
def weights_follow() -> Iterator[None]:
    """While active, adapter layers may leave adapter tensors uninitialised (:func:`defer_init`) because a checkpoint
    overwrites them right after injection (``from_pretrained`` / ``load_adapter``). Loading reports each tensor it
    writes (:func:`mark_loaded`); on exit every tensor still pending (missing from the checkpoint) is zeroed, so no
    uninitialised memory survives. Inits that change the base weights (PiSSA, OLoRA) must still run."""
    pending: dict[int, torch.Tensor] = {}
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
        with torch.no_grad():
            for tensor in pending.values():
                if not tensor.is_meta:
                    tensor.zero_()


def skip_random_init() -> bool:
    """True inside :func:`weights_follow`: adapter tensors will be overwritten by loaded weights."""
    return _PENDING.get() is not None


def defer_init(tensors: Iterable[torch.Tensor]) -> None:
    """Record uninitialised adapter tensors inside :func:`weights_follow` (zeroed on exit unless loaded)."""
    pending = _PENDING.get()
    if pending is None:
        raise RuntimeError("defer_init() outside weights_follow(): adapter tensors would stay uninitialised")
    for tensor in tensors:
        if not tensor.is_meta and tensor.numel():
            pending[tensor.data_ptr()] = tensor


def mark_loaded(tensor: torch.Tensor) -> None:
    """Tell :func:`weights_follow` that ``tensor`` (an adapter tensor or a detached view of it) is being fully written."""
    pending = _PENDING.get()
    if pending and not tensor.is_meta and tensor.numel():
        pending.pop(tensor.data_ptr(), None)


@dataclass
class AppliedPlan:
    """What :func:`apply_plan` changed: ``replaced`` maps module names to the modules they replaced."""

    adapter_name: str
    replaced: dict[str, nn.Module] = field(default_factory=dict)
    touched: list[str] = field(default_factory=list)


def adapter_dtype(base: nn.Module, autocast_adapter_dtype: bool) -> torch.dtype:
    """Adapters live in float32 on half-precision bases when ``autocast_adapter_dtype``; else in the base dtype."""
    weight = getattr(base, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
    if (autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16)) or not dtype.is_floating_point:
        return torch.float32
    return dtype


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_plan(
    model: nn.Module,
    plan: InjectionPlan,
    config: PeftConfig,
    method: MethodSpec,
    autocast_adapter_dtype: bool = True,
) -> AppliedPlan:
    """Wrap every planned module (or add the adapter to an existing wrapper). On failure, undo and re-raise."""
    applied = AppliedPlan(plan.adapter_name)
    try:
        for layer in plan.layers:
            module = model.get_submodule(layer.name)
            base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
            dtype = adapter_dtype(base, autocast_adapter_dtype)
            new = method.create_layer(module, layer.options, config, plan.adapter_name, dtype)
            applied.touched.append(layer.name)
            if new is not module:
                set_submodule(model, layer.name, new)
                applied.replaced[layer.name] = module
        for name in plan.modules_to_save:
            module = model.get_submodule(name)
            applied.touched.append(name)
            if isinstance(module, ModulesToSaveWrapper):
                module.update(plan.adapter_name)
            else:
                set_submodule(model, name, ModulesToSaveWrapper(module, plan.adapter_name))
                applied.replaced[name] = module
    except BaseException:
        rollback(model, applied)
        raise
    return applied


def rollback(model: nn.Module, applied: AppliedPlan) -> None:
    """Undo :func:`apply_plan`: drop the adapter from every touched module and restore replaced modules."""
    for name in applied.touched:
        if name in applied.replaced:
            continue
        module = model.get_submodule(name)
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)) and module.has_adapter(applied.adapter_name):
            module.delete_adapter(applied.adapter_name)
    for name, original in applied.replaced.items():
        set_submodule(model, name, original)
