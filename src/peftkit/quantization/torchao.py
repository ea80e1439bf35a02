"""torchao backend: linears whose weight is a torchao tensor subclass (e.g. ``Int8Tensor`` from
``quantize_(model, Int8WeightOnlyConfig())`` or ``TorchAoConfig`` in ``from_pretrained``).

Dequantizing uses the tensor's own ``dequantize()``. Re-quantizing is implemented for int8 weight-only tensors with
symmetric per-row or per-tensor scales (the ``Int8WeightOnlyConfig`` defaults); anything else (dynamic activation
quantization, int4, float8, ...) raises :class:`~peftkit.errors.MergeError` naming the tensor type.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MergeError


def _is_torchao_tensor(weight: object) -> bool:
    return type(weight).__module__.startswith("torchao")


class TorchaoBackend:
    """Any torchao-quantized linear for reading; int8 weight-only for writing."""

    name = "torchao"

    def matches(self, module: nn.Module) -> bool:
        return _is_torchao_tensor(module.weight)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        try:
            return weight.dequantize().float()
        except (NotImplementedError, AttributeError) as exc:
            raise MergeError(f"torchao: weights of type {type(weight).__name__} cannot be dequantized") from exc

    def cannot_requantize(self, module: nn.Module) -> str | None:
        weight = module.weight
        if _int8_weight_only_granularity(weight) is not None:
            return None
        return (
            f"torchao: cannot re-quantize weights of type {type(weight).__name__} ({_describe(weight)}); peftkit "
            "re-quantizes int8 weight-only tensors (Int8WeightOnlyConfig, per-row or per-tensor scales). Use "
            "merge_and_unload(dequantize=True) for a full-precision merged model"
        )

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        from torchao.quantization import Int8Tensor

        reason = self.cannot_requantize(module)
        if reason is not None:
            raise MergeError(reason)
        old = module.weight
        granularity = _int8_weight_only_granularity(old)
        fresh = Int8Tensor.from_hp(weight.to(old.device, old.dtype), granularity)
        module.weight = nn.Parameter(fresh, requires_grad=False)

    def prepare(self, module: nn.Module) -> None:
        """Nothing to do: int8 weight-only linears train through."""


def _int8_weight_only_granularity(weight: torch.Tensor) -> object:
    """``PerRow()`` / ``PerTensor()`` when ``weight`` is a symmetric int8 weight-only tensor, else None."""
    from torchao.quantization import Int8Tensor, PerRow, PerTensor

    if type(weight) is not Int8Tensor or getattr(weight, "act_quant_kwargs", None) is not None:
        return None
    zero_point = getattr(weight, "zero_point", None)
    if zero_point is not None and bool(zero_point.any()):  # asymmetric: from_hp would not reproduce it
        return None
    if getattr(weight, "reduce_range", False):
        return None
    out, inp = weight.shape
    block = list(weight.block_size)
    if block == [1, inp]:
        return PerRow()
    if block == [out, inp]:
        return PerTensor()
    return None


def _describe(weight: torch.Tensor) -> str:
    parts = [f"block_size={list(getattr(weight, 'block_size', []) or [])}"]
    if getattr(weight, "act_quant_kwargs", None) is not None:
        parts.append("with activation quantization")
    return ", ".join(parts)
