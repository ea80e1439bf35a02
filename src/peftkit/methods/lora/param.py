"""LoRA on a module's ``nn.Parameter`` (``LoraConfig(target_parameters=[...])``), above all the 3-D expert weights of
mixture-of-experts models (transformers 5 stores ``mlp.experts.gate_up_proj: (E, 2·ff, h)`` and
``mlp.experts.down_proj: (E, h, ff)`` as parameters, not ``nn.Linear`` modules).

Layout, as the reference's ``ParamWrapper`` (so files move both ways):

- a 2-D parameter is read as a linear weight ``(out, in)``; a 3-D one as ``(E, in, out)`` and then, unless the
  owning module says ``is_transposed = True`` (gpt-oss stores ``(E, in, out)``), swapped to ``(E, out, in)``;
- ``lora_A.weight: (r·E, in)`` holds expert ``e``'s ``A_e: (r, in)`` in rows ``e·r .. e·r + r`` (expert-major);
  ``lora_B.weight: (out, r·E)`` holds ``B_e: (out, r)`` in columns ``e, E + e, 2E + e, ...`` (rank-major);
- expert ``e``'s update of its weight is ``scaling · B_e @ A_e`` (in the ``(out, in)`` view), so on the tokens
  ``x: (n, in)`` routed to it the LoRA term is ``scaling · (x @ A_eᵀ) @ B_eᵀ``;
- one wrapper per targeted parameter; several parameters of one module nest (the first defined is innermost), and
  the checkpoint keys follow the nesting: ``experts.base_layer.lora_A.weight`` (``gate_up_proj``) and
  ``experts.lora_A.weight`` (``down_proj``).

The outermost wrapper computes the whole module: for transformers' experts modules the LoRA terms are added on the
routed tokens (:mod:`.experts`), without ever forming ``W + ΔW``; for any other module the parameters are replaced
by ``W + ΔW`` for the call (``torch.func.functional_call``), as the reference does on every forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import MergeError, UnsupportedModuleError, UnsupportedOperationError
from ...module_utils import add_child
from .experts import routed_forward
from .layers import LoraLayer, _empty


class ParamLayer(LoraLayer):
    """LoRA on the parameter ``parameter_name`` of ``base_layer`` (the module owning it, or an inner
    :class:`ParamLayer` of the same module)."""

    parameter_name: str
    num_experts: int
    #: the reference's ``_did_swap_in_out_features``: a 3-D parameter stored ``(E, out, in)``
    stored_out_in: bool

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        owner = base_layer.get_base_layer() if isinstance(base_layer, LoraLayer) else base_layer
        param = getattr(owner, parameter_name, None)
        if not isinstance(param, torch.Tensor) or param.dim() not in (2, 3):
            shape = None if not isinstance(param, torch.Tensor) else tuple(param.shape)
            raise UnsupportedModuleError(
                f"target_parameters: {type(owner).__name__}.{parameter_name} has shape {shape}; LoRA adapts 2-D "
                "(out, in) and 3-D (experts, ...) parameters only")
        if param.dim() == 3:
            experts, first, second = param.shape
            stored_out_in = not getattr(owner, "is_transposed", False)
            features = (second, first) if stored_out_in else (first, second)
        else:
            experts, stored_out_in, features = 1, False, (param.shape[1], param.shape[0])
        super().__init__(base_layer, fan_in_fan_out=False, features=(int(features[0]), int(features[1])))
        vars(self).update(parameter_name=parameter_name, num_experts=int(experts), stored_out_in=stored_out_in,
                          _inplace=False)

    # ------------------------------------------------------------------ structure
    def adapted_weight(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.parameter_name)

    def chain(self) -> list[ParamLayer]:
        """This layer and the :class:`ParamLayer` s it wraps, outermost first."""
        layers: list[ParamLayer] = [self]
        inner = self.base_layer
        while isinstance(inner, ParamLayer):
            layers.append(inner)
            inner = inner.base_layer
        return layers

    def find(self, parameter_name: str) -> ParamLayer | None:
        """The layer of the chain that adapts ``parameter_name``, if any."""
        return next((layer for layer in self.chain() if layer.parameter_name == parameter_name), None)

    def _create(self, adapter_name: str, r: int, lora_bias: bool, factory: dict[str, Any]) -> None:
        """``lora_A: (r·E, in)``, ``lora_B: (out, r·E)`` (``nn.Linear`` modules, as the reference)."""
        rank = r * self.num_experts
        add_child(self.lora_A, adapter_name, _empty(nn.Linear, self.in_features, rank, bias=False, **factory))
        add_child(self.lora_B, adapter_name, _empty(nn.Linear, rank, self.out_features, bias=lora_bias, **factory))

    def adapter_state(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """Own entries, then the inner wrapper's under ``base_layer.`` (the reference's nested keys)."""
        state = super().adapter_state(adapter_name)
        if isinstance(self.base_layer, ParamLayer):
            for saved, (memory, tensor) in self.base_layer.adapter_state(adapter_name).items():
                state[f"base_layer.{saved}"] = (f"base_layer.{memory}", tensor)
        return state

    # ------------------------------------------------------------------ factors and deltas
    def expert_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A: (E, r, in), B: (E, out, r))`` of ``adapter_name`` (views of the stored weights)."""
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        experts = self.num_experts
        return A.reshape(experts, -1, A.shape[-1]), B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``ΔW`` in the parameter's own layout: ``(out, in)`` for 2-D, ``(E, out, in)`` or (transposed storage)
        ``(E, in, out)`` for 3-D; in the parameter's dtype."""
        param = self.adapted_weight()
        scaling = self.scaling[adapter_name]
        if param.dim() == 2:
            delta = (self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight) * scaling
        else:
            A, B = self.expert_factors(adapter_name)
            delta = torch.bmm(B, A) * scaling  # (E, out, in)
            if not self.stored_out_in:
                delta = delta.transpose(1, 2)
        return delta.to(param.dtype)

    # ------------------------------------------------------------------ merging (into the parameter)
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        param = self.adapted_weight()
        for name in self._adapters_to_merge(adapter_names):
            delta = self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(param.detach() + delta).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            with torch.no_grad():
                param.data.add_(delta)
            self.merged_adapters.append(name)
        self._refresh()

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        param = self.adapted_weight()
        for name in self._adapters_to_merge(adapter_names, warn=False):
            if not torch.isfinite(param.detach() + self.get_delta_weight(name)).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    def unmerge(self) -> None:
        param = self.adapted_weight()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                param.data.sub_(self.get_delta_weight(name))
        self._refresh()

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The owning module's forward with every adapter of the chain applied (the module's own inputs and
        outputs, e.g. ``(hidden_states: (T, h), top_k_index: (T, k), top_k_weights: (T, k)) -> (T, h)`` for
        experts)."""
        chain = self.chain()
        module = self.get_base_layer()
        if self._disable_adapters:
            for layer in chain:
                if layer.merged_adapters:
                    layer.unmerge()
            return module(*args, **kwargs)
        if any(layer._row_adapters is not None for layer in chain):
            raise UnsupportedOperationError("adapter_names (mixed adapter batches) is not supported by adapters on "
                                            "parameters (target_parameters), as in the reference")
        active = [layer for layer in chain if layer._forward_adapters]
        if not active:
            return module(*args, **kwargs)
        if not torch.compiler.is_compiling():  # the routed loop is data-dependent: compiled code materialises
            out = routed_forward(module, {layer.parameter_name: layer for layer in active}, args, kwargs)
            if out is not None:
                return out
        values = {layer.parameter_name: layer.adapted_weight() + sum(map(layer.get_delta_weight,
                                                                         layer._forward_adapters))
                  for layer in active}  # W + ΔW for the call (deltas in the parameter's dtype)
        return torch.func.functional_call(module, values, args, kwargs, strict=False)
