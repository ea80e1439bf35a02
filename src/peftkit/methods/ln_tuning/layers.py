"""LN tuning layers: a trainable copy of the targeted module (a LayerNorm / RMSNorm by default) per adapter.

The forward pass runs the active adapter's copy instead of the base module (one adapter at a time, as in the
reference). Saved keys are those of the copy under ``ln_tuning_layers``: ``<module>.ln_tuning_layers.weight`` (and
``.bias``), e.g. ``weight: (hidden,)`` for a norm. Merging writes the copy's tensors into the base module and keeps
the base's own tensors to restore on unmerge (the reference swaps the two modules instead, so after a merge its
adapter slot holds the untrained base and a save writes that).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from ...errors import AdapterConflictError, MergeError, PeftWarning
from ...layers.base import AdapterLayer


class LNTuningLayer(AdapterLayer):
    """Holds ``ln_tuning_layers[adapter]``: a copy of the wrapped module, trained in its place."""

    adapter_layer_names = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict({})
        # the base module's own tensors while an adapter is merged into it (state-dict key -> tensor)
        self._unmerged_base: dict[str, torch.Tensor] = {}
        base = self.get_base_layer()
        self.in_features = getattr(base, "in_features", None)
        self.out_features = getattr(base, "out_features", None)

    def update_layer(self, adapter_name: str) -> None:
        """Add adapter ``adapter_name``: a copy of the base module as it was before any merge (the module only,
        with its parameters and buffers; their dtype is the base's, as in the reference)."""
        layer = copy.deepcopy(self.get_base_layer())
        if self._unmerged_base:
            with torch.no_grad():
                for key, tensor in layer.state_dict().items():
                    tensor.copy_(self._unmerged_base[key])
        self.ln_tuning_layers[adapter_name] = layer
        self._refresh()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The active adapter's copy applied to the inputs (the base module when disabled, merged or inactive)."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_replace(x, self.base_layer(x, *args, **kwargs),
                                      lambda name, xs: self.ln_tuning_layers[name](xs, *args, **kwargs))
        active = self._forward_adapters
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise AdapterConflictError(
                f"Trying to run forward with {len(active)} active adapters {list(active)}, but LN tuning runs one "
                "adapter at a time; call set_adapter(<one name>)"
            )
        return self.ln_tuning_layers[active[0]](x, *args, **kwargs)

    # ------------------------------------------------------------------ merging (replacement)
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the copy of the one adapter in ``adapter_names`` (default: the active one) into the base module.
        A previously merged adapter is unmerged first (with a warning), as in the reference."""
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        if len(names) > 1:
            raise MergeError(f"Trying to merge {len(names)} adapters, but LN tuning does not allow merging more "
                             "than one adapter at a time")
        if safe_merge:
            self.check_merge(names)
        if self.merged_adapters:
            warnings.warn(f"Already merged with {set(self.merged_adapters)}. Unmerging first.", PeftWarning,
                          stacklevel=2)
            self.unmerge()
        base_state = self.get_base_layer().state_dict()
        self._unmerged_base = {k: t.detach().clone() for k, t in base_state.items()}
        _copy_into(base_state, self.ln_tuning_layers[names[0]].state_dict())
        self.merged_adapters.append(names[0])
        self._refresh()

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if an adapter's copy holds NaN/inf."""
        for name in self._adapters_to_merge(adapter_names, warn=False):
            for tensor in self.ln_tuning_layers[name].state_dict().values():
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    def unmerge(self) -> None:
        """Restore the base module's own tensors."""
        if not self.merged_adapters:
            return
        _copy_into(self.get_base_layer().state_dict(), self._unmerged_base)
        self._unmerged_base = {}
        self.merged_adapters.clear()
        self._refresh()


def _copy_into(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    """``target[k].copy_(source[k])`` for every key of the state dict ``target`` (same module structure)."""
    with torch.no_grad():
        for key, tensor in target.items():
            tensor.copy_(source[key])
