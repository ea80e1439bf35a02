"""Entry points: ``get_peft_model``, ``inject_adapter_in_model``, ``get_peft_config``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn

from .config import PeftConfig
from .errors import ConfigError, ConfigTypeError, PeftWarning
from .layers.base import AdapterLayer
from .mixed_model import PeftMixedModel
from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from .registry import MethodSpec, all_methods, get_method
from .tuner import tuner_class
from .tuner_base import check_adapter_name
from .types import PeftType


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel | PeftMixedModel:
    """Wrap ``model`` with a new adapter and return the task's ``PeftModel`` subclass (``mixed=True``: a
    :class:`~peftkit.mixed_model.PeftMixedModel`, which also takes adapters of other compatible types).

    ``model`` is modified in place (targeted modules become adapter layers, all base parameters are frozen);
    ``peft_config`` is not modified. Use ``unload()`` to get the original modules back.
    """
    if not isinstance(peft_config, PeftConfig):
        raise ConfigError("peft_config", type(peft_config).__name__, "allowed: a PeftConfig instance (e.g. LoraConfig)")
    if not isinstance(model, nn.Module):
        raise ConfigTypeError("model", type(model).__name__, "allowed: a torch.nn.Module (e.g. a transformers model)")
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        warnings.warn(
            "the model already holds adapter layers; wrapping it again stacks adapters. To start fresh, call "
            ".unload() on the previous PeftModel before calling get_peft_model() again.",
            PeftWarning,
            stacklevel=2,
        )
    check_adapter_name(adapter_name)
    prefix = get_method(str(peft_config.peft_type)).prefix
    if adapter_name in prefix:
        warnings.warn(f"adapter_name {adapter_name!r} is a substring of the parameter prefix {prefix!r}; "
                      "this can confuse tools that search parameter names", PeftWarning, stacklevel=2)
    if revision is not None:
        if peft_config.revision is not None and peft_config.revision != revision:
            warnings.warn(f"the config sets the base model revision {peft_config.revision!r}; the revision argument "
                          f"{revision!r} overrides it", PeftWarning, stacklevel=2)
        peft_config = peft_config.copy(revision=revision)
    if mixed:
        return PeftMixedModel(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                              low_cpu_mem_usage=low_cpu_mem_usage)
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(peft_config.task_type), PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, Any] | None = None,
) -> nn.Module:
    """Add adapter layers to ``model`` in place and return it (no ``PeftModel`` wrapper).

    With ``state_dict``, the targets are the modules its keys name (``<path>.lora_A.weight`` -> ``<path>``).
    The model gets a ``peft_config`` attribute so that ``get_peft_model_state_dict`` works on it.
    """
    if peft_config.is_prompt_learning:
        raise ConfigError("peft_type", str(peft_config.peft_type),
                          "inject_adapter_in_model does not support prompt-learning methods")
    existing = getattr(model, "peft_config", None)
    if isinstance(existing, dict) and existing:
        raise ConfigError("model", type(model).__name__,
                          "it already holds injected adapters; add more through a PeftModel")
    tuner_class(peft_config.peft_type)(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                                       state_dict=state_dict)  # the state dict's keys name the targets
    return model


class _RegistryView(Mapping[PeftType, Any]):
    """A read-only ``{PeftType: value}`` view of the method registry (the reference's ``PEFT_TYPE_TO_*_MAPPING``).

    Built on each access from ``peftkit.registry``, so methods registered later appear; keys are ``PeftType``
    members (str enums: ``view["LORA"]`` works too). Register a method with ``register_method``, not by assignment.
    """

    def __init__(self, value: Callable[[MethodSpec], Any], include: Callable[[MethodSpec], bool]) -> None:
        self._value, self._include = value, include

    def _specs(self) -> dict[PeftType, MethodSpec]:
        return {spec.peft_type: spec for spec in all_methods() if self._include(spec)}

    def __getitem__(self, key: object) -> Any:
        specs = self._specs()
        try:
            return self._value(specs[PeftType(key)])
        except (ValueError, KeyError):
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[PeftType]:
        return iter(self._specs())

    def __len__(self) -> int:
        return len(self._specs())

    def __repr__(self) -> str:
        return repr(dict(self))


#: ``{PeftType: config class}`` of every registered method
PEFT_TYPE_TO_CONFIG_MAPPING: Mapping[PeftType, type[PeftConfig]] = _RegistryView(
    lambda spec: spec.config_cls, lambda spec: True)
#: ``{PeftType: tuner class}`` (``LoraModel``, ...; prompt-learning methods: their prompt tuner class)
PEFT_TYPE_TO_TUNER_MAPPING: Mapping[PeftType, type[nn.Module]] = _RegistryView(
    lambda spec: tuner_class(spec.peft_type), lambda spec: True)
#: ``{PeftType: tuner class}`` of the methods that can share a model with adapters of other types (a method's
#: ``MethodSpec.mixed_compatible``)
PEFT_TYPE_TO_MIXED_MODEL_MAPPING: Mapping[PeftType, type[nn.Module]] = _RegistryView(
    lambda spec: tuner_class(spec.peft_type), lambda spec: spec.mixed_compatible)


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """Build the config of ``config_dict["peft_type"]`` from a dict."""
    return PeftConfig.from_dict(config_dict)
