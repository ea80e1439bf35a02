"""Grouped matrix products: rows of ``x`` in consecutive groups, each group times its own matrix (the experts of
a mixture-of-experts layer on the tokens routed to them).

:func:`grouped_matmul` is the fast path (torch's ``grouped_mm``), :func:`grouped_matmul_reference` the plain form it
is tested against (values and gradients, ``tests/test_ops.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: torch's grouped matmul (torch >= 2.9), or None
_GROUPED_MM = getattr(F, "grouped_mm", None)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x: (S, in)`` whose rows ``offsets[e-1]:offsets[e]`` belong to group ``e``, ``weight: (E, in, out)`` ->
    ``(S, out)``, each group times its own matrix: ``torch.nn.functional.grouped_mm`` where torch has it, else
    :func:`grouped_matmul_reference`."""
    if _GROUPED_MM is not None and _fits_grouped_mm(x, weight):
        return _GROUPED_MM(x, weight, offs=offsets)
    return grouped_matmul_reference(x, weight, offsets)


def _fits_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What torch's ``grouped_mm`` accepts, forward and backward: float32 or bfloat16 operands of one dtype, each
    16-byte aligned with every stride but the unit one a multiple of 16 bytes, and ``in`` and ``out`` multiples of
    16 bytes too (its backward builds ``(E, in, out)`` and ``(S, in)`` gradients; a rank-2 LoRA factor is not)."""
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    size = x.element_size()
    if (weight.shape[-2] * size) % 16 or (weight.shape[-1] * size) % 16:
        return False
    for tensor in (x, weight):
        if tensor.data_ptr() % 16 or any(s != 1 and (s * size) % 16 for s in tensor.stride()):
            return False
    return True


def grouped_matmul_reference(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The plain form of :func:`grouped_matmul`: one matmul per non-empty group, concatenated (``split`` keeps the
    backward to one join of the groups' gradients)."""
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    parts = [rows @ weight[e] for e, rows in enumerate(torch.split(x, counts)) if rows.shape[0]]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[-1])
