"""LoRA on ``nn.MultiheadAttention`` (the reference's ``lora.MultiheadAttention``, same tensors and keys).

``nn.MultiheadAttention`` has no ``nn.Linear`` for its input projection (``in_proj_weight: (3E, E)`` is a bare
parameter) and never calls its ``out_proj``'s forward (it reads ``out_proj.weight: (E, E)``). So, as the reference:

- this layer holds the input-projection adapters: ``lora_A[a]: (r, E)``, ``lora_B[a]: (3E, r)``;
- the base's ``out_proj`` is replaced by a LoRA :class:`~.layers.Linear` holding the output-projection adapters, at
  ``<attn>.base_layer.out_proj`` (saved as ``<attn>.base_layer.out_proj.lora_A.weight``, ...);
- the forward runs the base attention with the effective weights ``W + sum_a scaling[a] * B[a] @ A[a]`` substituted
  for the base parameters (``torch.func.functional_call``: gradients reach A and B, the base parameters are never
  rebound). Like the reference, ``lora_dropout`` does not act here (the update is applied to the weights).

Only ``_qkv_same_embed_dim=True`` (no ``kdim`` / ``vdim``) is supported, as in the reference; DoRA, ``lora_bias``
and mixed-adapter batches are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from ...errors import ConfigError, UnsupportedModuleError, UnsupportedOperationError
from ...layers.base import AdapterLayer, _check_finite
from .layers import Linear, LoraLayer

#: path of the base weight of the output projection inside the wrapped ``nn.MultiheadAttention``
_OUT_WEIGHT = "out_proj.base_layer.weight"


def check_mha(name: str, base: nn.Module, config: PeftConfig) -> None:
    """Refuse, before anything is changed, what LoRA on ``nn.MultiheadAttention`` does not support."""
    if not getattr(base, "_qkv_same_embed_dim", True):
        raise UnsupportedModuleError(f"target module {name!r} is a MultiheadAttention with kdim={base.kdim}, "
                                     f"vdim={base.vdim} != embed_dim={base.embed_dim}; LoRA supports only query, key "
                                     "and value of the same dimension (kdim=vdim=None)")
    out_proj = base.out_proj.get_base_layer() if isinstance(base.out_proj, AdapterLayer) else base.out_proj
    if not isinstance(out_proj, nn.Linear):
        raise UnsupportedModuleError(f"target module {name!r}: out_proj is a {type(out_proj).__name__}; LoRA on "
                                     "MultiheadAttention needs an nn.Linear out_proj")
    for field_name, allowed in (("use_dora", False), ("lora_bias", False)):
        if getattr(config, field_name):
            raise ConfigError(field_name, True, f"LoRA on MultiheadAttention ({name!r}) does not support it; "
                              f"allowed: {allowed}")


class MultiheadAttention(LoraLayer):
    """LoRA on ``nn.MultiheadAttention``: ``in_proj_weight`` here, ``out_proj`` through a nested LoRA ``Linear``.

    The tuner reaches the nested layer on its own (activation, merging, deletion), so :meth:`merge` /
    :meth:`unmerge` of this layer handle ``in_proj_weight`` only; the forward adds whatever part is not merged.
    """

    _create = Linear._create

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, AdapterLayer) else base_layer
        super().__init__(base_layer, features=(base.embed_dim, 3 * base.embed_dim))
        if not isinstance(base.out_proj, Linear):
            base.out_proj = Linear(base.out_proj)

    # ------------------------------------------------------------------ structure
    def out_proj_layer(self) -> Linear:
        """The LoRA layer wrapping the base's ``out_proj``."""
        out = self.get_base_layer().out_proj
        assert isinstance(out, Linear)
        return out

    def adapted_weight(self) -> torch.Tensor:
        """``in_proj_weight: (3E, E)``."""
        return self.get_base_layer().in_proj_weight

    @property
    def weight(self) -> torch.Tensor:
        """``in_proj_weight`` (an ``nn.MultiheadAttention`` has no ``weight``)."""
        return self.adapted_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        """``in_proj_bias``."""
        return self.get_base_layer().in_proj_bias

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, **kwargs: Any) -> None:
        """Create adapter ``adapter_name`` on the input projection and on ``out_proj`` (same rank and options)."""
        super().update_layer(adapter_name, r, lora_alpha, **kwargs)
        self.out_proj_layer().update_layer(adapter_name, r, lora_alpha, **kwargs)

    # the nested out_proj layer follows this one (the tuner may reach it too: each call is idempotent)
    def set_adapter(self, adapter_names: str | list[str], trainable: dict[str, bool] | None = None) -> None:
        super().set_adapter(adapter_names, trainable)
        self.out_proj_layer().set_adapter(adapter_names, trainable)

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self.out_proj_layer().enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        out = self.out_proj_layer()
        if out.has_adapter(adapter_name):
            out.delete_adapter(adapter_name)

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """As :meth:`LoraLayer.adapter_state`, plus the ``out_proj`` adapter under ``base_layer.out_proj.``."""
        state = super().adapter_state(adapter_name)
        prefix = "base_layer.out_proj."
        for saved, (mem, tensor) in self.out_proj_layer().adapter_state(adapter_name).items():
            state[prefix + saved] = (prefix + mem, tensor)
        return state

    def unwrap_base(self) -> nn.Module:
        """The base ``nn.MultiheadAttention`` with its original ``out_proj`` put back (for unload / merge_and_unload;
        merged adapters stay in the weights)."""
        base = self.get_base_layer()
        base.out_proj = self.out_proj_layer().get_base_layer()
        return base

    # ------------------------------------------------------------------ merging (in_proj_weight)
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A``, shape ``(3E, E)``, in ``in_proj_weight``'s dtype."""
        return self._delta_product(adapter_name).to(self.adapted_weight().dtype)

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        return None

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        weight = self.adapted_weight()
        for name in self._adapters_to_merge(adapter_names, warn=False):
            _check_finite(weight, self.get_delta_weight(name), name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the input-projection updates of ``adapter_names`` (default: the active adapters) to ``in_proj_weight``."""
        weight = self.adapted_weight()
        for name in self._adapters_to_merge(adapter_names):
            delta = self.get_delta_weight(name)
            if safe_merge:
                _check_finite(weight, delta, name)
            with torch.no_grad():
                weight.data.add_(delta)
            self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self) -> None:
        """Subtract the merged input-projection updates from ``in_proj_weight``, last merged first."""
        weight = self.adapted_weight()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.data.sub_(self.get_delta_weight(name))
        self._refresh()

    # ------------------------------------------------------------------ forward
    def _effective(self, layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
        """``weight + sum_a scaling[a] * B[a] @ A[a]`` over ``layer``'s forward adapters (differentiable)."""
        for name in layer._forward_adapters:
            weight = weight + layer._delta_product(name).to(weight.dtype)
        return weight

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward`` (same arguments; ``query: (N, L, E)`` with ``batch_first``, else
        ``(L, N, E)``) with the unmerged adapters applied to ``in_proj_weight`` and ``out_proj.weight``."""
        out = self.out_proj_layer()
        if self._row_adapters is not None or out._row_adapters is not None:
            raise UnsupportedOperationError("lora.MultiheadAttention does not support mixed adapter batches "
                                            "(adapter_names=...)")
        if self._disable_adapters:
            for layer in (self, out):
                if layer.merged_adapters:
                    layer.unmerge()
            return self.base_layer(query, *args, **kwargs)
        params: dict[str, torch.Tensor] = {}
        if self._forward_adapters:
            params["in_proj_weight"] = self._effective(self, self.adapted_weight())
        if out._forward_adapters:
            params[_OUT_WEIGHT] = self._effective(out, out.get_base_layer().weight)
        if not params:
            return self.base_layer(query, *args, **kwargs)
        return torch.func.functional_call(self.base_layer, params, (query, *args), kwargs)
