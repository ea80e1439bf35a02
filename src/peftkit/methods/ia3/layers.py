"""(IA)³ layers: a learned vector per adapter that scales a layer's output (or, for feedforward modules, its input).

Shapes (as saved by the reference): linear / GPT-2 ``Conv1D`` ``ia3_l: (out, 1)``, feedforward ``(1, in)``;
convolutions ``(1, C, 1, ...)`` with ``C = out`` (``in`` for feedforward) and one trailing 1 per kernel dimension.
Merging multiplies the base weight (and, for non-feedforward modules, its bias) by the vector; unmerging divides by
``ia3_l + 1e-8``, as in the reference; it warns only when an entry is near 0 (|l| < 1e-6: the 1e-8 guard then shifts the result by over 1%), where the division
loses precision (the reference warns on every unmerge).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ...errors import MergeError, PeftWarning
from ...layers.base import AdapterLayer
from ...layers.dispatch import CONV, HF_CONV1D
from ...quantization import backend_of, dense_weight, measured_requantization, write_dense_weight

_UNMERGE_WARNING = "Unmerge result can be inaccurate for (IA)^3: some vector entries are close to 0."
#: vector entries below this magnitude make unmerging (a division) inaccurate; the reference warns on every unmerge
_SMALL = 1e-6


class IA3Layer(AdapterLayer):
    """(IA)³ on ``nn.Linear``, transformers' ``Conv1D`` (``fan_in_fan_out``) and ``nn.Conv1d/2d/3d``."""

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, kind: str, is_feedforward: bool, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict({})
        self.kind = kind
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = fan_in_fan_out
        base = self.get_base_layer()
        if kind == CONV:
            self.in_features, self.out_features = base.in_channels, base.out_channels
            self._kernel_dim = base.weight.dim()
        elif kind == HF_CONV1D:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        backend = backend_of(base)  # quantized linears: weights are read and written densely (peftkit.quantization)
        self.quantization_backend = None if backend is None else backend.name

    def _vector_shape(self) -> tuple[int, ...]:
        if self.kind == CONV:
            n = self.in_features if self.is_feedforward else self.out_features
            return (1, n) + (1,) * (self._kernel_dim - 2)
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def update_layer(self, adapter_name: str, init_ia3_weights: bool, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: a vector of ones (``init_ia3_weights=True``) or ~ N(0, 1)."""
        weight = self.get_base_layer().weight
        shape = self._vector_shape()
        if init_ia3_weights:
            vector = torch.ones(shape, device=weight.device, dtype=dtype)
        else:
            vector = torch.randn(shape, dtype=dtype).to(weight.device)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self._refresh()

    # ------------------------------------------------------------------ merging (multiplicative)
    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """The vector shaped to multiply the base weight (``(out, in, *k)`` for convs; ``(out, in)`` linear,
        ``(in, out)`` Conv1D)."""
        vec = self.ia3_l[adapter_name].detach()
        if self.kind == CONV:
            base = self.get_base_layer()
            if not self.is_feedforward:
                return vec.transpose(0, 1)  # (out, 1, *1)
            if base.groups == 1:
                return vec  # (1, in, *1)
            per_in, per_out = base.in_channels // base.groups, base.out_channels // base.groups
            v = vec.reshape(base.groups, 1, per_in, *vec.shape[2:])
            v = v.expand(base.groups, per_out, per_in, *vec.shape[2:])
            return v.reshape(base.out_channels, per_in, *vec.shape[2:])
        return vec.t() if self.fan_in_fan_out else vec

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Additive form of the merge, ``W ⊙ (l - 1)`` (same layout as the base weight; float32 when quantized)."""
        weight = dense_weight(self.get_base_layer()).detach()
        return weight * (self._weight_scale(adapter_name).to(weight.dtype) - 1)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Multiply the base weight (and the bias of non-feedforward modules) by each adapter's vector."""
        base = self.get_base_layer()
        for name in self._adapters_to_merge(adapter_names):
            weight = dense_weight(base).detach()
            new_w = weight * self._weight_scale(name).to(weight.dtype)
            new_b = None
            if not self.is_feedforward and base.bias is not None:
                new_b = base.bias.data * self.ia3_l[name].detach().reshape(base.bias.shape).to(base.bias.dtype)
            if safe_merge and not (torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all())):
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            with measured_requantization(self, name, new_w), torch.no_grad():
                write_dense_weight(base, new_w)
                if new_b is not None:
                    base.bias.data.copy_(new_b)
                self.merged_adapters.append(name)
                self._refresh()
        self._refresh()

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging would put NaN/inf into the base weights."""
        base = self.get_base_layer()
        for name in self._adapters_to_merge(adapter_names, warn=False):
            if not torch.isfinite(dense_weight(base).detach() * self._weight_scale(name)).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    def unmerge(self) -> None:
        """Divide the base weights by ``ia3_l + 1e-8`` for every merged adapter (approximate; warns)."""
        if not self.merged_adapters:
            return
        if any(bool((self.ia3_l[n].detach().abs() < _SMALL).any()) for n in self.merged_adapters if n in self.ia3_l):
            warnings.warn(_UNMERGE_WARNING, PeftWarning, stacklevel=2)
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight = dense_weight(base).detach()
                write_dense_weight(base, weight / (self._weight_scale(name) + 1e-8).to(weight.dtype))
                if not self.is_feedforward and base.bias is not None:
                    vec = self.ia3_l[name].detach().reshape(base.bias.shape)
                    base.bias.data.div_((vec + 1e-8).to(base.bias.dtype))
        self._refresh()

    # ------------------------------------------------------------------ forward
    def _combined(self) -> torch.Tensor | None:
        """Product of the forward adapters' vectors, flattened to ``(F,)`` (None: no adapter applies)."""
        scale = None
        for name in self._forward_adapters:
            vec = self.ia3_l[name].flatten()
            scale = vec if scale is None else scale * vec
        return scale

    def _row_scales(self, batch: int) -> torch.Tensor | None:
        """Mixed batch: ``(N, F)`` per-row vectors (ones for rows whose adapter this layer does not hold)."""
        plan = self.row_plan(batch)
        if not plan.present:
            return None
        vecs = [self.ia3_l[n].flatten() for n in plan.present]
        stack = torch.cat([torch.stack(vecs), torch.ones_like(vecs[0]).unsqueeze(0)])
        slots = torch.where(plan.index < 0, len(plan.present), plan.index)
        return stack[slots]

    def _shape_for(self, scale: torch.Tensor, ndim: int) -> torch.Tensor:
        """Broadcast ``scale`` (``(F,)`` or per-row ``(N, F)``) against a tensor of ``ndim`` dims."""
        if self.kind == CONV:  # channels at dim 1
            if scale.dim() == 1:
                return scale.reshape(-1, *([1] * (ndim - 2)))
            return scale.reshape(scale.shape[0], scale.shape[1], *([1] * (ndim - 2)))
        if scale.dim() == 1:
            return scale
        return scale.reshape(scale.shape[0], *([1] * (ndim - 2)), scale.shape[1])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Linear: ``x: (..., in) -> (..., out)``; conv: ``(N, C_in, *) -> (N, C_out, *)``."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        scale = self._row_scales(x.shape[0]) if self._row_adapters is not None else self._combined()
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            interm = x.to(scale.dtype) * self._shape_for(scale, x.dim())
            return self.base_layer(interm.to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result.to(scale.dtype) * self._shape_for(scale, result.dim())).to(result.dtype)
