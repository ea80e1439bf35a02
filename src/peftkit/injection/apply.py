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
from ..layers.modules_to_save import ModulesToSaveWrapper, check_module_to_save
from ..registry import MethodSpec
from .plan import InjectionPlan

#: while loading: ``{id(tensor): (tensor, device)}`` of adapter tensors left unfilled because a checkpoint fills them
_PENDING: ContextVar[dict[int, tuple[torch.Tensor, torch.device]] | None] = ContextVar(
    "peftkit_pending_init", default=None)


@contextmanager
def weights_follow() -> Iterator[None]:
    """While active, adapter layers may leave adapter tensors unfilled (:func:`defer_init`) because a checkpoint
    overwrites them right after injection (``from_pretrained`` / ``load_adapter``): on the meta device, so that the
    checkpoint tensor is adopted without allocating twice. Loading reports each tensor it writes
    (:func:`mark_loaded`); on exit every tensor still pending (missing from the checkpoint) becomes zeros on its
    device, so no unfilled memory or meta tensor survives. Inits that change the base weights (PiSSA, OLoRA) must
    still run. If the body raises (a failed load, whose caller removes the new adapter layers), nothing is
    materialised: a config whose sizes disagree with its checkpoint must not allocate the config's sizes."""
    pending: dict[int, tuple[torch.Tensor, torch.device]] = {}
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        pending.clear()
        raise
    finally:
        _PENDING.reset(token)
        with torch.no_grad():
            for tensor, device in pending.values():
                if tensor.is_meta:
                    adopt(tensor, torch.zeros(tensor.shape, dtype=tensor.dtype, device=device))
                else:
                    tensor.zero_()


def adopt(target: torch.Tensor, value: torch.Tensor) -> None:
    """Make the parameter (or tensor) ``target`` hold ``value``'s storage, whatever device ``target`` is on (e.g.
    meta), keeping its Python object (so modules, optimizers and hooks holding it see the change), its class and its
    ``requires_grad``. ``value`` must have ``target``'s shape and dtype and nothing may hold a view of ``target``."""
    new = nn.Parameter(value, requires_grad=target.requires_grad) if isinstance(target, nn.Parameter) else value
    torch.utils.swap_tensors(target, new)


#: True inside :func:`adapters_on_meta`
_META: ContextVar[bool] = ContextVar("peftkit_meta_adapters", default=False)
#: attribute of a meta adapter tensor left by :func:`adapters_on_meta`: the device it belongs on
_HOME = "_peftkit_home_device"


@contextmanager
def adapters_on_meta() -> Iterator[None]:
    """While active (``low_cpu_mem_usage=True``, as the reference's ``init_empty_weights``), the adapter tensors of
    new adapter layers are left on the meta device: no memory, no initialisation. They stay there until a load
    (``set_peft_model_state_dict``) gives them the checkpoint's tensors, on the device of the layer they adapt.
    Inside :func:`weights_follow` that context's rules win (tensors a checkpoint lacks become zeros on exit)."""
    token = _META.set(True)
    try:
        yield
    finally:
        _META.reset(token)


#: True inside :func:`probing`
_PROBE: ContextVar[bool] = ContextVar("peftkit_probe_adapters", default=False)


@contextmanager
def probing() -> Iterator[None]:
    """While active, new adapter layers are throw-away probes that a load injects to check a checkpoint's shapes
    and sizes before the real injection: every adapter tensor stays on the meta device and no init runs, not even
    one that reads or rewrites the base weights (PiSSA, OLoRA, DoRA's magnitude). Implies :func:`adapters_on_meta`."""
    token = _PROBE.set(True)
    try:
        with adapters_on_meta():
            yield
    finally:
        _PROBE.reset(token)


def is_probing() -> bool:
    """True inside :func:`probing`."""
    return _PROBE.get()


def meta_adapters_requested() -> bool:
    """True inside :func:`adapters_on_meta`."""
    return _META.get()


def move_to_meta(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each (non-meta) tensor's storage by a meta one of the same shape and dtype, remembering its device
    for the load (:func:`mark_loaded`); for layers that create their tensors for real (the non-LoRA methods)."""
    for tensor in tensors:
        if not tensor.is_meta:
            device = tensor.device
            adopt(tensor, torch.empty_like(tensor, device="meta"))
            setattr(tensor, _HOME, device)


def skip_random_init() -> bool:
    """True inside :func:`weights_follow` or :func:`adapters_on_meta`: adapter tensors will be overwritten by loaded
    weights."""
    return _PENDING.get() is not None or _META.get()


def defer_init(tensors: Iterable[torch.Tensor], device: torch.device | None = None) -> None:
    """Record unfilled adapter tensors inside :func:`weights_follow` (zeroed on exit unless loaded), or, inside
    :func:`adapters_on_meta`, leave them unfilled. Meta tensors need the ``device`` they belong on."""
    pending = _PENDING.get()
    if pending is None:
        if not _META.get():
            raise RuntimeError("defer_init() outside weights_follow(): adapter tensors would stay uninitialised")
        for tensor in tensors:
            if tensor.is_meta and device is not None:
                setattr(tensor, _HOME, device)
        return
    for tensor in tensors:
        if tensor.numel() and (device is not None or not tensor.is_meta):
            pending[id(tensor)] = (tensor, device if device is not None else tensor.device)


def mark_loaded(tensor: torch.Tensor) -> torch.device | None:
    """Tell :func:`weights_follow` that ``tensor`` (an adapter parameter) is being fully written; returns the device a
    deferred or meta adapter tensor belongs on (None when ``tensor`` was neither)."""
    pending = _PENDING.get()
    entry = pending.pop(id(tensor), None) if pending else None
    if entry is not None:
        return entry[1]
    return getattr(tensor, _HOME, None) if tensor.is_meta else None


@dataclass
class AppliedPlan:
    """What :func:`apply_plan` changed: ``replaced`` maps module names to the modules they replaced."""

    adapter_name: str
    replaced: dict[str, nn.Module] = field(default_factory=dict)
    touched: list[str] = field(default_factory=list)


def adapter_dtype(base: nn.Module, autocast_adapter_dtype: bool) -> torch.dtype:
    """Adapters live in float32 on half-precision bases when ``autocast_adapter_dtype``; else in the base dtype (of
    its ``weight``, or of its first floating-point parameter: an experts module holds ``gate_up_proj`` etc.)."""
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        weight = next((p for p in base.parameters(recurse=False) if p.is_floating_point()), None)
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
            if _META.get() and _PENDING.get() is None and isinstance(new, AdapterLayer):
                move_to_meta(new.adapter_parameters(plan.adapter_name))  # LoRA left them there already
            if not base.training:
                # new modules start in training mode: an adapter injected into an eval-mode model would apply its
                # dropout at inference (the reference does; PEFT issue #3753). The new internals follow the base.
                new.train(False)
            if new is not module:
                set_submodule(model, layer.name, new)
                applied.replaced.setdefault(layer.name, module)  # several wrappers may nest at one name
        for name in plan.modules_to_save:
            module = model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                check_module_to_save(module, name)
            applied.touched.append(name)
            if isinstance(module, ModulesToSaveWrapper):
                module.update(plan.adapter_name)
            else:
                set_submodule(model, name, ModulesToSaveWrapper(module, plan.adapter_name))
                applied.replaced[name] = module
        if method.extra_layers is not None:  # e.g. LoRA's trainable_token_indices
            method.extra_layers(model, config, plan.adapter_name, applied, autocast_adapter_dtype)
    except BaseException:
        rollback(model, applied)
        raise
    return applied


def rollback(model: nn.Module, applied: AppliedPlan) -> None:
    """Undo :func:`apply_plan`: drop the adapter from every touched module and restore replaced modules."""
    for name in applied.touched:
        if name in applied.replaced:
            continue
        # the layers nested in a touched one too (LoRA's chain of parameter layers, MHA's out_proj)
        for module in model.get_submodule(name).modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)) and module.has_adapter(applied.adapter_name):
                module.delete_adapter(applied.adapter_name)
    for name, original in applied.replaced.items():
        _unwrap_down_to(model.get_submodule(name), original)
        set_submodule(model, name, original)


def _unwrap_down_to(module: nn.Module, original: nn.Module) -> None:
    """Unwrap the layers nested at one name down to ``original``, so that layers which also wrap modules inside
    their base (MHA's ``out_proj``) put those back (``unwrap_base``)."""
    while module is not original and isinstance(module, AdapterLayer):
        unwrap = getattr(type(module), "unwrap_base", None)
        module = unwrap(module) if unwrap else module.get_base_layer()
