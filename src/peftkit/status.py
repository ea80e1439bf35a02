"""Adapter status reports: ``get_layer_status`` (one record per adapter layer) and ``get_model_status`` (a summary).

The fields and their values are the reference's (``peft.peft_model.TunerLayerStatus`` / ``TunerModelStatus``). A
summary field is ``"irregular"`` when the layers disagree (e.g. an adapter trainable in some layers and frozen in
others), which means the model is in an inconsistent state. ``modules_to_save`` wrappers count as adapter layers,
as in the reference.

One deliberate difference: ``merged_adapters`` is checked for consistency over the layers that can merge. The
reference also counts ``modules_to_save`` wrappers, which hold every adapter and never merge, so any model with
``modules_to_save`` and a merged adapter reports ``"irregular"`` there although nothing is inconsistent; peftkit
reports the merged adapters.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .errors import ConfigError
from .layers.base import AdapterLayer
from .layers.modules_to_save import ModulesToSaveWrapper
from .peft_model import PeftModel, _numel
from .tuner import TunerModel

IRREGULAR = "irregular"


@dataclass
class TunerLayerStatus:
    """The state of one adapter layer (or ``modules_to_save`` wrapper).

    Attributes:
        name: module path, e.g. ``model.layers.0.self_attn.q_proj`` (relative to the tuner for a ``PeftModel``).
        module_type: e.g. ``lora.Linear``, ``lora.Embedding``, ``lora.Conv2d``, ``ModulesToSaveWrapper``.
        enabled: False while adapters are disabled.
        active_adapters: the layer's active adapter names.
        merged_adapters: adapters merged into the base weights.
        requires_grad: ``{adapter: True | False | "irregular"}`` over the adapter's parameters in this layer.
        available_adapters: sorted names of the adapters this layer holds.
        devices: ``{adapter: sorted device types}`` of the adapter's parameters.
        quantization_backend: e.g. ``"bnb 4bit"``, or None.
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """Summary over every adapter layer; fields the layers disagree on are ``"irregular"``.

    Attributes:
        base_model_type: class name of the user's model (``"other"`` for a plain ``nn.Module`` that is not a
            ``PeftModel`` nor a transformers model, as in the reference).
        adapter_model_type: the tuner's class name (``"LoraModel"``), ``"None"`` without a ``PeftModel``.
        peft_types: ``{adapter: "LORA", ...}`` (empty without a ``PeftModel``).
        trainable_params, total_params: parameter counts (shared parameters once).
        num_adapter_layers: number of adapter layers and ``modules_to_save`` wrappers.
        merged_adapters: adapters merged in every adapter layer that holds them (``modules_to_save`` wrappers
            never merge and are not counted); ``"irregular"`` when merged in some layers only.
    """

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Literal["irregular"]
    active_adapters: list[str] | Literal["irregular"]
    merged_adapters: list[str] | Literal["irregular"]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Literal["irregular"]


AdapterModule = AdapterLayer | ModulesToSaveWrapper


def _tuner_of(model: nn.Module) -> TunerModel | None:
    if isinstance(model, PeftModel):
        tuner = model.base_model
        if not isinstance(tuner, TunerModel):
            raise TypeError(f"get_layer_status() needs a PeftModel whose base_model is a tuner, got "
                            f"{type(tuner).__name__} (prompt-learning methods have no adapter layers)")
        return tuner
    return model if isinstance(model, TunerModel) else None


def _adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    root = _tuner_of(model) or model
    for name, module in root.named_modules():
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            yield name, module


def _agree(values: Iterable[bool | str]) -> bool | Literal["irregular"]:
    """True if every value is True, False if every value is False, else ``"irregular"``."""
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return IRREGULAR


def _module_type(module: AdapterModule) -> str:
    """``lora.Linear``-style names as the reference's reprs give them."""
    if isinstance(module, ModulesToSaveWrapper):
        return type(module).__name__
    cls_name = type(module).__name__
    base_name = type(module.get_base_layer()).__name__
    if base_name.startswith(cls_name) and base_name != cls_name:  # one class for Conv1d/2d/3d: name the base's kind
        cls_name = base_name
    parts = type(module).__module__.split(".")
    method = parts[parts.index("methods") + 1] if "methods" in parts[:-1] else None
    return f"{method}.{cls_name}" if method else cls_name


def _quantization_backend(module: AdapterModule) -> str | None:
    backend = module.__dict__.get("quantization_backend")
    if backend is None:
        backend = getattr(type(module), "quantization_backend", None)
    if backend is None or isinstance(backend, str):
        return backend
    return getattr(backend, "backend_name", str(backend))


def _layer_status(name: str, module: AdapterModule) -> TunerLayerStatus:
    available = sorted(a for a in module.adapter_names() if module.has_adapter(a))
    params = {a: module.adapter_parameters(a) for a in available}
    return TunerLayerStatus(
        name=name,
        module_type=_module_type(module),
        enabled=not module.disable_adapters,
        active_adapters=module.active_adapters,
        merged_adapters=list(module.merged_adapters) if isinstance(module, AdapterLayer) else [],
        requires_grad={a: _agree(p.requires_grad for p in ps) for a, ps in params.items()},
        available_adapters=available,
        devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items()},
        quantization_backend=_quantization_backend(module),
    )


def _statuses(model: nn.Module) -> list[tuple[TunerLayerStatus, bool]]:
    """``(status, can merge)`` of every adapter module."""
    status = [(_layer_status(name, module), isinstance(module, AdapterLayer)) for name, module in _adapter_modules(model)]
    if not status:
        raise ConfigError("model", type(model).__name__, "it holds no adapter layers; pass a PeftModel or a model "
                          "with injected adapters")
    return status


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer and ``modules_to_save`` wrapper of ``model``, in module order.

    ``model``: a ``PeftModel`` (names relative to its tuner, ``model.<path>``, as in the reference), a tuner, or a
    model with injected adapters (names relative to it). Raises :class:`ConfigError` when it holds no adapter layer.
    """
    return [status for status, _ in _statuses(model)]


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def _count(model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for param in model.parameters():
        count = _numel(param)
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def _header(model: nn.Module) -> tuple[str, str, dict[str, str]]:
    """``(base_model_type, adapter_model_type, peft_types)``."""
    tuner = _tuner_of(model)
    if tuner is None:
        return (type(model).__name__ if _is_transformers_model(model) else "other"), "None", {}
    peft_types = {name: _peft_type_name(config.peft_type) for name, config in tuner.peft_config.items()}
    return type(tuner.model).__name__, type(tuner).__name__, peft_types


def _peft_type_name(peft_type: object) -> str:
    """``"LORA"`` for ``PeftType.LORA`` or ``"LORA"``."""
    return str(getattr(peft_type, "value", peft_type))


def _merged(layers: list[TunerLayerStatus]) -> list[str] | Literal["irregular"]:
    """Adapters merged in at least one layer; ``"irregular"`` if one of them is held unmerged by some layer."""
    merged: set[str] = set().union(*(s.merged_adapters for s in layers))
    for s in layers:
        if merged & (set(s.available_adapters) - set(s.merged_adapters)):
            return IRREGULAR
    return sorted(merged)


def _single(values: set) -> object:
    return next(iter(values)) if len(values) == 1 else IRREGULAR


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """A summary of :func:`get_layer_status` with parameter counts and the model's adapter types."""
    statuses = _statuses(model)
    layers = [status for status, _ in statuses]
    base_type, adapter_type, peft_types = _header(model)
    trainable, total = _count(model)
    actives = {tuple(s.active_adapters) for s in layers}
    grads: dict[str, list[bool | str]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for s in layers:
        for adapter, value in s.requires_grad.items():
            grads[adapter].append(value)
        for adapter, types in s.devices.items():
            devices[adapter].update(types)
    return TunerModelStatus(
        base_model_type=base_type,
        adapter_model_type=adapter_type,
        peft_types=peft_types,
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=_single({s.enabled for s in layers}),  # type: ignore[arg-type]
        active_adapters=list(actives.pop()) if len(actives) == 1 else IRREGULAR,
        merged_adapters=_merged([status for status, can_merge in statuses if can_merge]),
        requires_grad={adapter: _agree(values) for adapter, values in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={adapter: sorted(types) for adapter, types in devices.items()},
        quantization_backend=_single({s.quantization_backend for s in layers}),  # type: ignore[arg-type]
    )
