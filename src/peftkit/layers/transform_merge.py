"""Merging of the methods whose adapter transforms the base weight (``W ← T(W)``: OFT, BOFT, HRA, MiSS) rather
than adding a delta: the merge, its non-finite check and the unmerge, written once over the method's transform.

``transform(name, W)`` and ``inverse(name, W)`` take and return the dense weight (``dense_weight``: the weight
itself for plain layers, the dequantized ``(out, in)`` float32 weight for quantized linears); a quantized base is
re-quantized on write and the rounding is measured (``peftkit.quantization``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..errors import MergeError
from ..quantization.backends import dense_weight, write_dense_weight
from ..quantization.merge import measured_requantization
from .base import AdapterLayer

#: ``(adapter name, dense weight) -> transformed dense weight``
Transform = Callable[[str, torch.Tensor], torch.Tensor]


def non_finite_error(name: str) -> MergeError:
    """The reference's error for a merge that would write NaN/inf (adapter ``name``)."""
    return MergeError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")


def merge_transforms(layer: AdapterLayer, names: Iterable[str], transform: Transform, safe_merge: bool) -> None:
    """Write ``transform(name, W)`` into the base weight for each of ``names`` in order, recording each merge;
    ``safe_merge``: a non-finite result raises :class:`MergeError` before it is written."""
    base = layer.get_base_layer()
    for name in names:
        weight = dense_weight(base).detach()
        with torch.no_grad():
            new = transform(name, weight).to(weight.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise non_finite_error(name)
        with measured_requantization(layer, name, new):
            write_dense_weight(base, new)
            layer.merged_adapters.append(name)
            layer._refresh()
    layer._refresh()


def check_transforms(layer: AdapterLayer, names: Iterable[str], transform: Transform, chain: bool) -> None:
    """Raise :class:`MergeError` if merging ``names`` would put NaN/inf into the base weight; ``chain``: each
    transform applies to the previous one's result (as the merge does), else each to the current weight."""
    weight = dense_weight(layer.get_base_layer()).detach()
    for name in names:
        with torch.no_grad():
            new = transform(name, weight)
        if not torch.isfinite(new).all():
            raise non_finite_error(name)
        if chain:
            weight = new


def unmerge_transforms(layer: AdapterLayer, inverse: Transform) -> None:
    """Undo the merges, last merged first: ``W ← inverse(name, W)``."""
    base = layer.get_base_layer()
    while layer.merged_adapters:
        name = layer.merged_adapters.pop()
        with torch.no_grad():
            weight = dense_weight(base).detach()
            write_dense_weight(base, inverse(name, weight).to(weight.dtype))
    layer._refresh()
