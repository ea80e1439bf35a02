"""AdaLoRA's SVD-form adapter layer for ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv1d/2d/3d`` (groups=1).

Per adapter ``a`` with rank ``r``: ``lora_A[a]: (r, in)`` (convolutions: ``(r, in * prod(kernel))``),
``lora_E[a]: (r, 1)``, ``lora_B[a]: (out, r)``, all bare parameters of ``nn.ParameterDict``s (saved without
``.weight``), and the update ``ΔW = B @ (A * E) * scaling / (ranknum + 1e-5)``. ``ranknum`` is the rank the adapter
was created with (``init_r``); it is a plain float, never saved, and stays the same when the layer is resized by a
``rank_pattern`` so that a pruned adapter computes exactly what it computed before.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...injection.apply import defer_init, mark_loaded, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import CONV, HF_CONV1D

#: added to ``ranknum`` in the denominator, as the reference does
RANKNUM_EPS = 1e-5


class SVDLayer(AdapterLayer):
    """AdaLoRA on one base layer; ``kind`` is ``"linear"``, ``"hf_conv1d"`` (weight ``(in, out)``) or ``"conv"``."""

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum")

    def __init__(self, base_layer: nn.Module, kind: str) -> None:
        super().__init__(base_layer)
        self.kind = kind
        self.fan_in_fan_out = kind == HF_CONV1D
        self.lora_A = nn.ParameterDict({})
        self.lora_E = nn.ParameterDict({})
        self.lora_B = nn.ParameterDict({})
        self.lora_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}
        base = self.get_base_layer()
        if kind == CONV:
            self.in_features, self.out_features = base.in_channels, base.out_channels
            self._a_columns = base.in_channels * math.prod(base.kernel_size)
        elif kind == HF_CONV1D:
            self.in_features, self.out_features = base.weight.shape
            self._a_columns = self.in_features
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
            self._a_columns = self.in_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights: bool, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name`` of rank ``r``: ``A, B ~ N(0, 0.02)``, ``E = 0`` (identity), or every
        factor ``~ N(0, 1)`` with ``init_lora_weights=False``."""
        weight = self.get_base_layer().weight
        factory = {"device": weight.device, "dtype": dtype or weight.dtype}
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        self.ranknum[adapter_name] = float(r)
        self.lora_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        deferred = skip_random_init()  # a load fills them: on meta, no init, never the config's sizes allocated
        if deferred:
            meta = {"device": "meta", "dtype": factory["dtype"]}
            A, E, B = (torch.empty(r, self._a_columns, **meta), torch.empty(r, 1, **meta),
                       torch.empty(self.out_features, r, **meta))
        else:
            A = torch.randn(r, self._a_columns).to(**factory)
            E = torch.randn(r, 1).to(**factory)
            B = torch.randn(self.out_features, r).to(**factory)
            if init_lora_weights:
                A.normal_(0.0, 0.02)
                B.normal_(0.0, 0.02)
                E.zero_()
        self.lora_A[adapter_name] = nn.Parameter(A)
        self.lora_E[adapter_name] = nn.Parameter(E)
        self.lora_B[adapter_name] = nn.Parameter(B)
        if deferred:
            defer_init(self.adapter_parameters(adapter_name), weight.device)
        self.set_adapter(self._active_adapter or [adapter_name])

    def resize(self, adapter_name: str, keep: torch.Tensor) -> None:
        """Keep only the triplets ``keep: (r,) bool`` of ``adapter_name`` (rank becomes ``keep.sum()``, possibly 0).
        ``ranknum``, trainability and the kept values are unchanged, so the outputs are too when the dropped
        ``E`` entries were 0."""
        if self.lora_E[adapter_name].is_meta:  # not filled yet (a load, or its probe): resize the placeholders
            kept = int(keep.to(torch.bool).sum())
            for attr, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                holder = getattr(self, attr)
                old = holder[adapter_name]
                home = mark_loaded(old)  # the old placeholder leaves the load's bookkeeping, the new one joins it
                shape = [*old.shape[:dim], kept, *old.shape[dim + 1:]]
                holder[adapter_name] = nn.Parameter(torch.empty(shape, device="meta", dtype=old.dtype),
                                                    requires_grad=old.requires_grad)
                defer_init([holder[adapter_name]], home)
            self.r[adapter_name] = kept
            return
        keep = keep.to(device=self.lora_E[adapter_name].device, dtype=torch.bool).view(-1)
        for attr, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            holder = getattr(self, attr)
            old = holder[adapter_name]
            holder[adapter_name] = nn.Parameter(old.detach().index_select(dim, keep.nonzero().view(-1)).clone(),
                                                requires_grad=old.requires_grad)
        self.r[adapter_name] = int(keep.sum())

    # ------------------------------------------------------------------ math
    def _factor(self, adapter_name: str) -> float:
        return self.scaling[adapter_name] / (self.ranknum[adapter_name] + RANKNUM_EPS)

    def _delta_matrix(self, adapter_name: str) -> torch.Tensor:
        """``B @ (A * E) * scaling / (ranknum + 1e-5)``: ``(out, in)`` (convolutions ``(out, in * prod(k))``)."""
        A, E, B = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        return (B @ (A * E)) * self._factor(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update in the base weight's layout (``(in, out)`` for ``Conv1D``) and dtype."""
        delta = self._delta_matrix(adapter_name)
        weight = self.get_base_layer().weight
        if self.kind == CONV:
            delta = delta.reshape(weight.shape)
        elif self.fan_in_fan_out:
            delta = delta.t()
        return delta.to(weight.dtype)

    def _update(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for input ``x`` (dropout applied), in ``lora_A``'s dtype."""
        A = self.lora_A[adapter_name]
        x = self.lora_dropout[adapter_name](x.to(A.dtype))
        if self.kind == CONV:
            base = self.get_base_layer()
            return base._conv_forward(x, self._delta_matrix(adapter_name).reshape(base.weight.shape), None)
        E, B = self.lora_E[adapter_name], self.lora_B[adapter_name]
        return F.linear(F.linear(x, A * E), B) * self._factor(adapter_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + Σ_active update(x)``; ``x: (..., in)`` (convolutions ``(N, C_in, *spatial)``)."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_add(x, result, self._update)
        for name in self._forward_adapters:
            result = result + self._update(name, x).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"adalora, {super().extra_repr()}, r={self.r}"
