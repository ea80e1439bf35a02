"""Merging an additive adapter (``W + ΔW``) into a quantized linear base: dequantize, add, re-quantize, measure.

A mixin for :class:`~peftkit.layers.base.AdapterLayer` subclasses whose ``get_delta_weight(name)`` returns a float32
``(out, in)`` delta for quantized bases and that set ``quantization_backend`` (the backend's name, or None for a
plain base, where the generic merge runs unchanged).
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from ..quantization import dense_weight, measured_requantization, write_dense_weight
from .base import AdapterLayer


class AdditiveQuantizedMerge(AdapterLayer):
    """``merge`` / ``check_merge`` / ``unmerge`` that also work on quantized linear bases (the rounding error of
    each re-quantization is recorded by ``peftkit.quantization`` and reported by the tuner)."""

    quantization_backend: str | None = None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas of ``adapter_names`` (default: the active adapters) into the base weight; a quantized
        weight is dequantized, updated and re-quantized."""
        if self.quantization_backend is None:
            super().merge(safe_merge, adapter_names)
            return
        base = self.get_base_layer()
        for name in self._adapters_to_merge(adapter_names):
            new_w = dense_weight(base).detach() + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(new_w).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            with measured_requantization(self, name, new_w):
                write_dense_weight(base, new_w)
                self.merged_adapters.append(name)
                self._refresh()
        self._refresh()

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging ``adapter_names`` would put NaN/inf into the base weight."""
        if self.quantization_backend is None:
            super().check_merge(adapter_names)
            return
        weight = dense_weight(self.get_base_layer()).detach()
        for name in self._adapters_to_merge(adapter_names, warn=False):
            if not torch.isfinite(weight + self.get_delta_weight(name)).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta, last merged first (a quantized weight is re-quantized once)."""
        if self.quantization_backend is None:
            super().unmerge()
            return
        base = self.get_base_layer()
        weight = dense_weight(base).detach()
        while self.merged_adapters:
            weight = weight - self.get_delta_weight(self.merged_adapters.pop())
        write_dense_weight(base, weight)
        self._refresh()
