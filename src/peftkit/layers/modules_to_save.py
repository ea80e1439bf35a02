"""``ModulesToSaveWrapper``: a full trainable copy of a module per adapter (``modules_to_save``)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import AdapterConflictError, UnsupportedModuleError
from .base import AdapterLayer, AdapterState

#: containers whose ``forward`` cannot be called: a copy of one could never run in place of the original
_FORBIDDEN = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


def check_module_to_save(module: nn.Module, path: str = "") -> None:
    """Raise :class:`UnsupportedModuleError` (a ``TypeError``, as in the reference) when ``module`` cannot be a
    ``modules_to_save`` entry: a container without a forward (``ModuleDict``, ``ModuleList``, ``ParameterDict``,
    ``ParameterList``) or an adapter layer."""
    if isinstance(module, (*_FORBIDDEN, AdapterLayer)):
        where = f" {path!r}" if path else ""
        raise UnsupportedModuleError(
            f"modules_to_save cannot be applied to modules of type {type(module)} (module{where}): a container "
            "has no forward to run and an adapter layer is adapted already; name the modules inside it instead, "
            "e.g. the entries of the container"
        )


class ModulesToSaveWrapper(AdapterState, nn.Module):
    """Keeps ``original_module`` frozen and one trainable deep copy per adapter in ``modules_to_save``.

    The forward runs the copy of the first active adapter that has one, else the original. The copies are saved
    under the original module's path (``classifier.weight``), as the reference does.
    """

    def __init__(self, module_to_save: nn.Module, adapter_name: str, copy_: nn.Module | None = None) -> None:
        check_module_to_save(module_to_save)
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: list[str] = [adapter_name]
        self._disable_adapters = False
        self._row_adapters: tuple[str, ...] | None = None  # per-row adapter names during a mixed batch
        self.update(adapter_name, copy_)

    # ------------------------------------------------------------------ adapters
    def update(self, adapter_name: str, copy_: nn.Module | None = None) -> None:
        """Create the copy for ``adapter_name`` (trainable); ``copy_``: use that module instead of a deep copy of the
        original (e.g. one sharing a tied weight with another copy, as the reference's ``tied_module``)."""
        copied = copy.deepcopy(self.original_module) if copy_ is None else copy_
        for param in copied.parameters():
            param.requires_grad_(True)
        self.modules_to_save[adapter_name] = copied

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def has_adapter(self, name: str) -> bool:
        return name in self.modules_to_save

    def check_set_adapter(self, adapter_names: Iterable[str], path: str = "") -> list[str]:
        """The names among ``adapter_names`` that hold a copy here (at most one).

        Raises :class:`AdapterConflictError` (a ``ValueError``, as the reference raises) when several do: only one
        copy of a module can run, and silently picking one would train or evaluate the wrong weights.
        """
        held = [name for name in adapter_names if name in self.modules_to_save]
        if len(held) > 1:
            where = f"module {path!r}" if path else type(self.original_module).__name__
            raise AdapterConflictError(
                f"Only one adapter can be set at a time for modules_to_save {where}, got {len(held)}: adapters "
                f"{held} each hold a copy of it; activate at most one of them together with other adapters"
            )
        return held

    def set_adapter(self, adapter_names: str | Iterable[str], trainable: dict[str, bool] | None = None) -> None:
        """Activate ``adapter_names``; copies of active adapters train unless ``trainable`` says otherwise.

        ``active_adapters`` then lists only the adapter that holds a copy here (none: the original runs).
        Raises :class:`AdapterConflictError` when several of ``adapter_names`` hold a copy.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapter = self.check_set_adapter(names)
        self.original_module.requires_grad_(False)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(bool((trainable or {}).get(name, True)) and name in names)

    def enable_adapters(self, enabled: bool) -> None:
        """Enable (True) or disable (False) the copies; disabling freezes them, like adapter layers (and the
        reference)."""
        self._disable_adapters = not enabled
        if not enabled:
            self.modules_to_save.requires_grad_(False)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[adapter_name].parameters()) if adapter_name in self.modules_to_save else []

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        # the caller (the tuner) activates the model's new active adapters on every module afterwards
        self._active_adapter = [a for a in self._active_adapter if a != adapter_name]

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """``{saved key: (in-memory key, tensor)}``: the copy's state under the original module's names."""
        if adapter_name not in self.modules_to_save:
            return {}
        return {
            key: (f"modules_to_save.{adapter_name}.{key}", tensor)
            for key, tensor in self.modules_to_save[adapter_name].state_dict(keep_vars=True).items()
        }

    # ------------------------------------------------------------------ forward
    def _current(self) -> nn.Module:
        if not self._disable_adapters:
            for name in self._active_adapter:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._row_adapters is not None and not self._disable_adapters:
            return self._mixed_forward(*args, **kwargs)
        return self._current()(*args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Mixed batch: rows go through the copy of their own adapter (the original for ``"__base__"`` rows and
        adapters without a copy here). ``x: (N, ...)``; the output must be a tensor with the batch in dim 0."""
        from .base import expand_rows

        rows = expand_rows(self._row_adapters or (), x.shape[0])
        groups: dict[str, list[int]] = {}
        for b, name in enumerate(rows):
            groups.setdefault(name if name in self.modules_to_save else "", []).append(b)
        modules = {name: self.modules_to_save[name] if name else self.original_module for name in groups}
        if len(groups) == 1:
            return modules[next(iter(groups))](x, *args, **kwargs)
        out: torch.Tensor | None = None
        for name, idx in groups.items():
            index = torch.tensor(idx, device=x.device)
            part = modules[name](x.index_select(0, index), *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, index, part)
        assert out is not None
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self._current(), name)
