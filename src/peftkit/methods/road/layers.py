"""RoAd layers: a learned 2-D rotation and scale of each pair of output features of an ``nn.Linear``.

Shapes (as saved by the reference): ``road_theta`` / ``road_alpha``: ``(out / 2,)`` for ``road_1``, ``(out,)`` for
``road_2``, ``(2 * out,)`` for ``road_4`` (``rotation.road_coefficients`` says how each is laid out). The forward
pass is elementwise on the base output ``y: (..., out)`` (``rotation.apply_road``: two fused passes, with a
hand-written backward that keeps only ``y``); merging writes ``R @ W`` and
``R @ b`` by rotating the rows of the weight and the bias (the same elementwise map, no dense ``out x out`` matrix);
unmerging applies the exact 2x2 inverse of each block (the reference inverts the dense ``R`` with
``torch.linalg.inv``). Several active adapters compose: ``y' = R_k ... R_1 y``, in the order they are active.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import MergeError
from ...layers.base import AdapterLayer
from ...quantization import backend_of, dense_weight, measured_requantization, write_dense_weight
from .config import ROAD_VARIANTS
from .rotation import apply_road, apply_road_rows, invert_coefficients, road_coefficients


class RoadLayer(AdapterLayer):
    """RoAd on ``nn.Linear`` (plain or quantized): ``y' = R(base(x))`` with ``R`` block-diagonal of 2x2 blocks."""

    adapter_layer_names = ("road_theta", "road_alpha")
    other_param_names = ("variant", "group_size")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.road_theta = nn.ParameterDict({})
        self.road_alpha = nn.ParameterDict({})
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        backend = backend_of(base)
        self.quantization_backend = None if backend is None else backend.name

    def update_layer(
        self, adapter_name: str, variant: str, group_size: int, init_weights: bool, dtype: torch.dtype | None = None
    ) -> None:
        """Create adapter ``adapter_name``: ``theta = 0, alpha = 1`` (identity) when ``init_weights``, else
        ``theta ~ N(0, 0.5²)``, ``alpha ~ N(1, 0.5²)`` (the reference's test initialisation)."""
        size = int(self.out_features * ROAD_VARIANTS[variant])
        device = self.get_base_layer().weight.device
        if init_weights:
            theta = torch.zeros(size, dtype=dtype, device=device)
            alpha = torch.ones(size, dtype=dtype, device=device)
        else:
            theta = torch.empty(size, dtype=dtype).normal_(0.0, 0.5).to(device)
            alpha = torch.empty(size, dtype=dtype).normal_(1.0, 0.5).to(device)
        self.road_theta[adapter_name] = nn.Parameter(theta)
        self.road_alpha[adapter_name] = nn.Parameter(alpha)
        self.variant[adapter_name] = variant
        self.group_size[adapter_name] = group_size
        self._refresh()

    def coefficients(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(G, 2, group_size / 2)``, of adapter ``adapter_name`` (differentiable)."""
        return road_coefficients(self.variant[adapter_name], self.group_size[adapter_name],
                                 self.road_theta[adapter_name], self.road_alpha[adapter_name])

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: the base output, rotated by each forward adapter in turn."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._row_adapters is not None:
            return self.mixed_replace(result, result, self._rotate_rows)  # rotations act on the output rows
        if not self._forward_adapters:
            return result
        out_dtype = result.dtype
        for name in self._forward_adapters:
            cos, sin = self.coefficients(name)
            result = apply_road(result.to(cos.dtype), cos, sin)
        return result.to(out_dtype)

    def _rotate_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s rotation of base-output rows ``(n, ..., out)`` (mixed batches)."""
        cos, sin = self.coefficients(name)
        return apply_road(rows.to(cos.dtype), cos, sin)

    # ------------------------------------------------------------------ merging (multiplicative: W' = R W)
    def _rotated(self, adapter_name: str, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(R W, R b)`` (``inverse``: ``(R⁻¹ W, R⁻¹ b)``) of the current base weights; ``b`` None without bias.
        Computed in the adapter's dtype, returned in the weight's / bias's dtype (a quantized weight: float32)."""
        base = self.get_base_layer()
        with torch.no_grad():
            cos, sin = self.coefficients(adapter_name)
            if inverse:
                cos, sin = invert_coefficients(cos, sin)
            weight = dense_weight(base).detach()
            new_w = apply_road_rows(weight.to(cos.dtype), cos, sin).to(weight.dtype)
            new_b = None
            if base.bias is not None:
                new_b = apply_road_rows(base.bias.detach().to(cos.dtype), cos, sin).to(base.bias.dtype)
        return new_w, new_b

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Additive form of the merge, ``R W - W`` (the base weight's layout; float32 when quantized)."""
        new_w, _ = self._rotated(adapter_name)
        return new_w - dense_weight(self.get_base_layer()).detach()

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        """Additive form of the merged bias, ``R b - b`` (None without a bias)."""
        _, new_b = self._rotated(adapter_name)
        bias = self.get_base_layer().bias
        return None if new_b is None else new_b - bias.detach()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write ``R W`` and ``R b`` for each adapter of ``adapter_names`` (default: the active ones), in order.
        With ``safe_merge``, NaN/inf in the result raise :class:`MergeError` before anything is written."""
        for name in self._adapters_to_merge(adapter_names):
            new_w, new_b = self._rotated(name)
            if safe_merge:
                _check_finite(name, new_w, new_b)
            with measured_requantization(self, name, new_w):  # quantized bases: records the rounding error
                _write(self.get_base_layer(), new_w, new_b)
                self.merged_adapters.append(name)
                self._refresh()
        self._refresh()

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging would put NaN/inf into the base weights."""
        for name in self._adapters_to_merge(adapter_names, warn=False):
            _check_finite(name, *self._rotated(name))

    def unmerge(self) -> None:
        """Undo the merges, last merged first, with the exact inverse of each 2x2 block."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            _write(self.get_base_layer(), *self._rotated(name, inverse=True))
        self._refresh()


def _write(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Store ``weight`` (re-quantized when ``base`` is quantized) and ``bias`` in ``base``."""
    with torch.no_grad():
        write_dense_weight(base, weight)
        if bias is not None:
            base.bias.data.copy_(bias)


def _check_finite(adapter_name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
        raise MergeError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
