"""``BaseTuner``: what every tuner shares (the layer-injecting ``TunerModel`` and the prompt-learning tuner).

It holds the user's model, ``{adapter_name: config}`` (peftkit's own copies), the active adapters and their
trainability, forwards unknown attributes to the model, and checks names and configs of new adapters.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import PureWindowsPath
from typing import Any

from torch import nn

from .config import PeftConfig
from .errors import AdapterExistsError, AdapterNotFoundError, ConfigError
from .registry import MethodSpec, get_method

#: the name that routes a row of a mixed batch through the base model only (so no adapter may take it)
BASE_ROW = "__base__"

#: what an adapter name may be (it becomes a sub-directory name in ``save_pretrained``)
_NAME_RULE = ("allowed: a non-empty str usable as one directory name: no '/' or '\\' (or other path separator), "
              "not '.' or '..', not an absolute or drive path, no NUL character")


def check_adapter_name(adapter_name: object) -> str:
    """``adapter_name`` if it may name an adapter, else :class:`ConfigError` naming ``adapter_name``.

    A non-default adapter is saved to ``os.path.join(save_directory, adapter_name)``, so a name must be a single
    path component that stays inside ``save_directory``: no path separator (``/``, ``\\``, ``os.sep``,
    ``os.altsep``), not ``.``/``..``, not absolute, no Windows drive (``C:x``), no NUL. (The reference accepts all
    of these, and saves ``"/abs/x"`` to ``/abs/x``.)
    """
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ConfigError("adapter_name", adapter_name, _NAME_RULE)
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if (
        adapter_name in (".", "..")
        or "\0" in adapter_name
        or any(sep in adapter_name for sep in separators)  # type: ignore[operator]
        or os.path.isabs(adapter_name)
        or PureWindowsPath(adapter_name).drive
    ):
        raise ConfigError("adapter_name", adapter_name, _NAME_RULE)
    return adapter_name


class BaseTuner(nn.Module):
    """Shared state of tuners.

    Attributes:
        model: the wrapped model.
        peft_config: ``{adapter_name: config}``; each config is peftkit's own copy with resolved fields.
        targeted_module_names: names of the modules holding adapter layers.
        targeted_parameter_names: ``"<module>.<parameter>"`` of the parameters adapted (``target_parameters``).
    """

    prefix: str = ""
    #: whether adapters of different (mixed-compatible) methods may share this tuner, their layers nesting on a
    #: module (``peftkit.mixed_model.MixedModel``); otherwise all adapters must have one peft type
    _nests_methods: bool = False

    def __init__(self, model: nn.Module, task_heads: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._trainable: dict[str, bool] = {}
        self._task_heads = tuple(task_heads)
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []
        #: ``{adapter_name: undo}`` of the model changes made before injecting that adapter (``MethodSpec.
        #: prepare_model``, e.g. LoRA's layer replication); :meth:`_restore_model` runs them
        self._prepared: dict[str, Callable[[], None]] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def _restore_model(self) -> nn.Module:
        """Give the model back as it was before this tuner touched it (used when a load fails, and to discard a
        load's probe): ``unload()``, then undo every ``MethodSpec.prepare_model`` change its adapters made (LoRA's
        replicated layers, which a plain ``unload()`` keeps, as the reference does)."""
        model = self.unload()  # type: ignore[attr-defined]
        for undo in reversed(list(self._prepared.values())):
            undo()
        self._prepared.clear()
        return model

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def peft_type(self) -> str:
        first = next(iter(self.peft_config.values()), None)
        return str(first.peft_type) if first is not None else ""

    @property
    def method(self) -> MethodSpec:
        return get_method(self.peft_type)

    def adapter_layers_enabled(self) -> bool | str:
        """True when every adapter layer / ``modules_to_save`` wrapper (and, for the prompt tuner, the routing of
        inputs) is enabled, False when all are disabled, ``"irregular"`` when they disagree (as the reference's
        ``get_model_status().enabled``)."""
        flags = {not module.disable_adapters for _, module in self.adapter_modules()}  # type: ignore[attr-defined]
        disabled = vars(self).get("_disabled")  # the prompt tuner's model-level switch
        if isinstance(disabled, bool):
            flags.add(not disabled)
        if len(flags) > 1:
            return "irregular"
        return flags.pop() if flags else True

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Set ``requires_grad`` of every tensor of the named adapters, active or not (as the reference), and
        remember it as their trainability, so that a later ``set_adapter`` keeps it. Unknown names raise."""
        names = self._require([adapter_names] if isinstance(adapter_names, str) else adapter_names)
        for name in names:
            self._trainable[name] = bool(requires_grad)
        for _, module in self.adapter_modules():  # type: ignore[attr-defined]
            for name in names:
                for param in module.adapter_parameters(name):
                    param.requires_grad_(requires_grad)

    def _require(self, names: Iterable[str]) -> list[str]:
        """``names`` as a list; raises :class:`AdapterNotFoundError` for a name this tuner does not hold."""
        names = list(names)
        for name in names:
            if name not in self.peft_config:
                raise AdapterNotFoundError(name, self.peft_config)
        return names

    def _check_new_adapter(self, config: PeftConfig, adapter_name: str) -> MethodSpec:
        """The method of ``config`` after checking that ``adapter_name`` may be added with it."""
        if not isinstance(config, PeftConfig):
            raise ConfigError("peft_config", type(config).__name__, "allowed: a PeftConfig instance")
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterExistsError(f"Adapter with name {adapter_name!r} already exists.")
        if adapter_name == BASE_ROW:
            raise ConfigError("adapter_name", adapter_name, f"{BASE_ROW!r} is reserved for base-model rows of mixed "
                              "batches; choose another name")
        if self.peft_config and not self._nests_methods and str(config.peft_type) != self.peft_type:
            raise ConfigError(
                "peft_type", str(config.peft_type),
                f"Cannot combine adapters with different peft types; this model holds {self.peft_type} adapters",
            )
        return get_method(str(config.peft_type))
