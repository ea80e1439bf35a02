"""HRA layers: the base weight ``W: (out, n)`` becomes ``W R`` with ``R = H_1 ⋯ H_r`` a product of Householder
reflections (``householder.py``), on ``nn.Linear`` (``n = in``) and ungrouped ``nn.Conv1d/2d/3d``
(``n = in · prod(kernel)``, the flattened weight's columns).

Linear layers reflect the activations (``y = base(x Rᵀ)``: two rank-``r`` products per adapter) instead of building
the dense ``R`` and ``W R`` on every forward as the reference does; convolutions rotate the weight with rank-``r``
products (``W - (W P) Qᵀ``). Several active adapters compose as ``W R_1 R_2 ⋯`` in activation order, as the
reference's ``new_weight = R_1 @ R_2 @ ⋯``. Merging writes ``W R`` into the base weight; unmerging ``W Rᵀ``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ...errors import PeftWarning
from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.transform_merge import check_transforms, merge_transforms, unmerge_transforms
from .householder import dense_reflection, householder_factors, reflect_rows, rotate_weight

ODD_RANK_WARNING = "The symmetric initialization can NOT be performed when r is odd!"
GS_INIT_WARNING = (
    "HRA with apply_GS=True cannot start at the identity (I - 2QQᵀ with orthonormal Q never is), and the "
    "symmetric (paired-column) initialization makes the Gram-Schmidt of each pair divide rounding noise by ~0, "
    "giving a non-orthogonal R; peftkit initialises every column at random instead (as init_weights=False)."
)


def _random_columns(n: int, r: int) -> torch.Tensor:
    """``(n, r)`` Kaiming-uniform columns (``a = sqrt(5)``), as the reference's random HRA init."""
    u = torch.empty(n, r)
    nn.init.kaiming_uniform_(u, a=math.sqrt(5))
    return u


def init_columns(n: int, r: int, init_weights: bool, apply_gs: bool) -> torch.Tensor:
    """Initial ``hra_u: (n, r)``. ``init_weights`` with even ``r`` and no Gram-Schmidt: ``r/2`` random columns, each
    repeated twice in a row, so that ``R = ∏ H_i = I`` (``H H = I``); otherwise random columns (warning when
    ``init_weights`` asked for the identity)."""
    if init_weights and apply_gs:
        warnings.warn(GS_INIT_WARNING, PeftWarning, stacklevel=4)
    elif init_weights and r % 2:
        warnings.warn(ODD_RANK_WARNING, PeftWarning, stacklevel=4)
    if not init_weights or apply_gs or r % 2:
        return _random_columns(n, r)
    return torch.repeat_interleave(_random_columns(n, r // 2), 2, dim=1)


class HRALayer(AdapterLayer):
    """HRA adapters on ``nn.Linear`` and ungrouped ``nn.Conv1d/2d/3d``; ``hra_u[name]: (n, r)`` is saved as
    ``hra_u`` (reference key and shape)."""

    adapter_layer_names = ("hra_u",)
    other_param_names = ("hra_r", "hra_apply_GS")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hra_u = nn.ParameterDict({})
        self.hra_r: dict[str, int] = {}
        self.hra_apply_GS: dict[str, bool] = {}
        base = self.get_base_layer()
        self.is_conv = not isinstance(base, nn.Linear)
        # as the reference: Linear in/out_features, conv in/out_channels
        self.in_features: int = base.in_channels if self.is_conv else base.in_features
        self.out_features: int = base.out_channels if self.is_conv else base.out_features
        self.columns: int = base.weight[0].numel()  # n: in (Linear) or in · prod(kernel) (conv)

    def update_layer(self, adapter_name: str, r: int, apply_gs: bool, init_weights: bool,
                     dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name`` with ``hra_u: (n, r)`` in ``dtype`` (default: the base weight's)."""
        weight = self.get_base_layer().weight
        self.hra_r[adapter_name] = r
        self.hra_apply_GS[adapter_name] = apply_gs
        dtype = dtype or weight.dtype
        if skip_random_init():  # a load fills it: never allocate or draw it
            self.hra_u[adapter_name] = nn.Parameter(torch.empty(self.columns, r, device="meta", dtype=dtype))
            defer_init([self.hra_u[adapter_name]], weight.device)
        else:
            u = init_columns(self.columns, r, init_weights, apply_gs)
            self.hra_u[adapter_name] = nn.Parameter(u.to(device=weight.device, dtype=dtype))
        self.set_adapter(self._active_adapter or [adapter_name])

    # ------------------------------------------------------------------ the transform
    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, Q)``, each ``(n, r)``, with ``R = I - P Qᵀ`` for adapter ``adapter_name``."""
        return householder_factors(self.hra_u[adapter_name], self.hra_apply_GS[adapter_name])

    def reflection(self, adapter_name: str) -> torch.Tensor:
        """The dense orthogonal ``R: (n, n)`` of adapter ``adapter_name`` (the reference's ``get_delta_weight``)."""
        return dense_reflection(self.hra_u[adapter_name], self.hra_apply_GS[adapter_name])

    def _rotated_weight(self, names: tuple[str, ...] | list[str], weight: torch.Tensor | None = None,
                        transpose: bool = False) -> torch.Tensor:
        """``W R_1 R_2 ⋯`` over ``names`` (``transpose``: ``W R_1ᵀ R_2ᵀ ⋯``) as a flat ``(out, n)`` matrix in the
        last adapter's dtype (computed in the factors' float64); ``weight`` defaults to the base weight."""
        w = self.get_base_layer().weight if weight is None else weight
        dtype = w.dtype
        w = w.reshape(w.shape[0], -1)
        for name in names:
            p, q = self.factors(name)
            w = rotate_weight(w, p, q, transpose=transpose)
            dtype = self.hra_u[name].dtype
        return w.to(dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Additive form of merging ``adapter_name``: ``W R - W`` in the base weight's shape and dtype."""
        weight = self.get_base_layer().weight.detach()
        rotated = self._rotated_weight([adapter_name], weight)
        return (rotated.reshape(weight.shape) - weight.to(rotated.dtype)).to(weight.dtype)

    # ------------------------------------------------------------------ merging (multiplicative)
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Replace the base weight by ``W R`` for each adapter of ``adapter_names`` (default: the active ones)."""
        merge_transforms(self, self._adapters_to_merge(adapter_names),
                         lambda name, w: self._rotated_weight([name], w).reshape(w.shape), safe_merge)

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging ``adapter_names`` would put NaN/inf into the base weight."""
        check_transforms(self, self._adapters_to_merge(adapter_names, warn=False),
                         lambda name, w: self._rotated_weight([name], w), chain=False)

    def unmerge(self) -> None:
        """Undo the merges, last first: ``W ← W Rᵀ`` (``R`` is orthogonal)."""
        unmerge_transforms(self, lambda name, w: self._rotated_weight([name], w, transpose=True).reshape(w.shape))

    # ------------------------------------------------------------------ forward
    def _reflect(self, x: torch.Tensor, names: tuple[str, ...] | list[str]) -> torch.Tensor:
        """``x R_kᵀ ⋯ R_1ᵀ`` for Linear inputs ``x: (..., in)`` (the input of ``W R_1 ⋯ R_k``), in the adapters'
        dtype (as the reference casts the input to its ``hra_u``'s)."""
        for name in reversed(names):
            p, q = self.factors(name)
            x = reflect_rows(x.to(self.hra_u[name].dtype), p, q)
        return x

    def _conv(self, x: torch.Tensor, names: tuple[str, ...] | list[str]) -> torch.Tensor:
        """The base convolution of ``x: (B, C_in, *spatial)`` with the weight ``W R_1 ⋯ R_k`` (and the base bias)."""
        base = self.get_base_layer()
        weight = self._rotated_weight(names).reshape(base.weight.shape)
        bias = None if base.bias is None else base.bias.to(weight.dtype)
        return base._conv_forward(x.to(weight.dtype), weight, bias)

    def _adapted(self, x: torch.Tensor, names: tuple[str, ...] | list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.is_conv:
            return self._conv(x, names)
        dtype = self.get_base_layer().weight.dtype
        return self.base_layer(self._reflect(x, names).to(dtype), *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Linear ``x: (..., in) -> (..., out)``; conv ``(B, C_in, *) -> (B, C_out, *)``; output in ``x``'s dtype."""
        return self.forward_replacing(x, self._adapted, *args, **kwargs)
