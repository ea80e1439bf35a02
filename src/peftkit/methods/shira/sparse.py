"""SHiRA's update as tensor functions: ``y = x (W + ΔW)ᵀ + b`` with ``ΔW`` sparse (``k`` entries of ``W: (out, in)``).

``indices: (2, k)`` are the entries' rows and columns in ``W`` (``positions: (k,)`` their flat row-major positions
``row * in + col``); ``values: (k,)`` the trained entries; ``scaling`` multiplies them. Several adapters add their
entries (duplicates add, as the reference's COO sum).

The reference builds a sparse COO ``ΔW`` every forward, adds it to a clone of ``W`` and multiplies by the result,
which autograd keeps (an ``(out, in)`` copy per adapted layer, alive until backward). :func:`sparse_linear` scatters
the entries into a fresh ``W`` copy (``index_add``), multiplies, and drops the copy; backward rebuilds it for
``∂L/∂x = g (W + ΔW)`` and reads ``∂L/∂v_j = scaling · (xᵀ g)[col_j, row_j]`` from one dense ``(in, out)`` product
(a BLAS matmul beats gathering ``k`` columns of ``g`` and ``x`` at SHiRA's densities of a few percent).
:func:`merged_weight` is the plain differentiable form (used under ``torch.compile`` and without autograd).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def flat_positions(indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(k,)`` row-major positions ``row * in + col`` of ``indices: (2, k)`` (rows, columns) in an ``(out, in)``
    matrix: int32 when ``indices`` are int32 (the saved format) and ``out * in`` fits, else int64."""
    if indices.dtype == torch.int32 and shape[0] * shape[1] < 2**31:
        return indices[0] * shape[1] + indices[1]
    return indices[0].long() * shape[1] + indices[1].long()


def transposed_positions(indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(k,)`` positions ``col * out + row`` of ``indices: (2, k)`` in the row-major ``(in, out)`` transpose of an
    ``(out, in)`` matrix (dtype as :func:`flat_positions`)."""
    return flat_positions(indices.flip(0), (shape[1], shape[0]))


def merged_weight(weight: torch.Tensor, positions: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                  scalings: Sequence[float]) -> torch.Tensor:
    """``W + Σ_a scaling_a · scatter(values_a at positions_a)``: ``(out, in)`` in ``weight``'s dtype, a new tensor
    (differentiable in ``values`` and ``weight``)."""
    flat = weight.reshape(-1)
    for pos, val, scale in zip(positions, values, scalings):
        flat = flat.index_add(0, pos, val.to(weight.dtype), alpha=scale)
    return flat.view_as(weight)


class _SparseLinear(torch.autograd.Function):
    """``F.linear(x, merged_weight(...), bias)`` keeping only ``x``, ``W``, the values and the ``(2, k)`` int32 index
    buffers for backward (flat positions are recomputed: saving them would keep ``8 k`` bytes per layer)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, indices: tuple[torch.Tensor, ...], scalings: tuple[float, ...],
                *values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, *values, *indices)
        ctx.scalings, ctx.count = scalings, len(values)
        positions = [flat_positions(index, weight.shape) for index in indices]
        with torch.no_grad():
            return F.linear(x, merged_weight(weight, positions, values, scalings), bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        x, weight, *rest = ctx.saved_tensors
        values, indices = rest[:ctx.count], rest[ctx.count:]
        needs = ctx.needs_input_grad
        grad_x = grad_w = grad_wt = grad_b = None
        if needs[0]:
            positions = [flat_positions(index, weight.shape) for index in indices]
            grad_x = grad @ merged_weight(weight, positions, values, ctx.scalings)
        grad_rows = grad.reshape(-1, grad.shape[-1])
        if needs[1] or any(needs[5:]):
            # (in, out) = xᵀ g: the product autograd's own mm backward computes for W (read transposed)
            grad_wt = x.reshape(-1, x.shape[-1]).to(grad.dtype).t() @ grad_rows
            grad_w = grad_wt.t()
        grad_values = tuple(
            grad_wt.reshape(-1).index_select(0, transposed_positions(index, weight.shape)).mul_(scale).to(val.dtype)
            if need else None
            for index, val, scale, need in zip(indices, values, ctx.scalings, needs[5:]))
        if needs[2]:
            grad_b = grad_rows.sum(0)
        return (grad_x, grad_w if needs[1] else None, grad_b, None, None, *grad_values)


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                  scalings: Sequence[float]) -> torch.Tensor:
    """``x (W + ΔW)ᵀ + b``: ``x: (..., in)``, ``weight: (out, in)``, ``indices``: one ``(2, k_a)`` (rows, columns)
    per adapter, ``values``: ``(k_a,)`` -> ``(..., out)``. Under ``torch.compile`` or without autograd the plain
    :func:`merged_weight` product; else :class:`_SparseLinear`, whose backward keeps no ``(out, in)`` tensor."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        positions = [flat_positions(index, weight.shape) for index in indices]
        return F.linear(x, merged_weight(weight, positions, values, scalings), bias)
    return _SparseLinear.apply(x, weight, bias, tuple(indices), tuple(scalings), *values)
