"""LoRA (and DoRA) on quantized linears (bitsandbytes 8-bit / 4-bit, torchao int8).

The forward pass is :class:`~.layers.Linear`'s: the quantized base computes ``base(x)`` with its own kernel and the
adapter adds ``scaling * B(A(dropout(x)))`` in float32. Everything that needs the base *weight* (DoRA's norm, the
dropout path of DoRA, merging) reads the dense ``(out, in)`` float32 weight from :mod:`peftkit.quantization`, and
merging writes a new dense weight back, which the backend re-quantizes; the rounding this introduces is measured
(see :func:`peftkit.quantization.measured_requantization`). No code here depends on the backend.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import MergeError
from ...quantization import backend_of, dense_weight, measured_requantization, write_dense_weight
from .dora import view_norm
from .layers import Linear


class QuantLinear(Linear):
    """LoRA on a quantized ``nn.Linear`` subclass; ``in_features`` / ``out_features`` come from the layer (a
    packed 4-bit weight has shape ``(out * in / 2, 1)``)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        backend = backend_of(base)
        #: the backend's name (``"bnb 8bit"``, ``"bnb 4bit"``, ``"torchao"``), as ``get_layer_status`` reports it
        self.quantization_backend = None if backend is None else backend.name

    def _dense(self) -> torch.Tensor:
        """The dequantized base weight ``(out, in)``, float32."""
        return dense_weight(self.get_base_layer()).detach()

    def _weight_out_in(self) -> torch.Tensor:
        return self._dense()

    def _dora_norm(self, adapter_name: str) -> torch.Tensor:
        view = self._dense()
        return view_norm(view, self._dora_delta(adapter_name, view)).reshape(self._dora_magnitude_shape())

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A``, ``(out, in)``, float32 (the quantized weight has no float dtype to cast to)."""
        return self._delta_product(adapter_name).float()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """False, as the reference's quantized LoRA layers."""
        return False

    def _merged_weight(self, name: str, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(dense weight with adapter name merged, DoRA norm or None)``."""
        delta = self.get_delta_weight(name).detach().to(dense.device)
        if name not in self.lora_magnitude_vector:
            return dense + delta, None
        norm = view_norm(dense, delta)
        return self._dora_factor(name, norm, dense) * (dense + delta), norm

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        dense = self._dense()
        for name in self._adapters_to_merge(adapter_names, warn=False):
            new, _ = self._merged_weight(name, dense)
            _require_finite(new, name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize, add each adapter (DoRA: rescale rows), re-quantize; each merge is measured."""
        base = self.get_base_layer()
        for name in self._adapters_to_merge(adapter_names):
            new, norm = self._merged_weight(name, self._dense())
            delta_b = self.get_delta_bias(name)
            if delta_b is not None and base.bias is None:
                raise MergeError(f"cannot merge adapter {name!r}: it has a bias (lora_bias=True) but the base layer "
                                 "has bias=None")
            if safe_merge:
                _require_finite(new, name)
            with measured_requantization(self, name, new):
                write_dense_weight(base, new)
                if delta_b is not None:
                    with torch.no_grad():
                        base.bias.data.add_(delta_b.detach().to(base.bias.dtype))
                if norm is not None:
                    self._dora_merged_norm[name] = norm
                self.merged_adapters.append(name)
                self._refresh()

    def unmerge(self) -> None:
        """Dequantize, remove the merged adapters (last first), re-quantize (adds one more rounding)."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            dense = self._dense()
            delta = self.get_delta_weight(name).detach().to(dense.device)
            if name in self.lora_magnitude_vector:
                old = dense / self._dora_factor(name, self._dora_merged_norm.pop(name), dense) - delta
            else:
                old = dense - delta
            write_dense_weight(base, old)
            delta_b = self.get_delta_bias(name)
            if delta_b is not None:
                with torch.no_grad():
                    base.bias.data.sub_(delta_b.detach().to(base.bias.dtype))
        self._refresh()


def _require_finite(weight: torch.Tensor, name: str) -> None:
    if not torch.isfinite(weight).all():
        raise MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
