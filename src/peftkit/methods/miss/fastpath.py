"""The training fast path of a ``"miss"`` / ``"mini"`` adapter on a frozen ``nn.Linear``: one autograd function.

The plain path (``MissLayer._add_shared``) is ``y = base(x) + shard_sum(x) @ B``; autograd then computes the input
gradient as ``g W`` plus the tiled ``g Bᵀ`` (a small product and an ``(N, in)`` add) and keeps an ``(N, out)``
temporary in the forward. Here the forward adds into the base output in place, and the backward computes
``grad_x = g (W + ΔW)`` in one product, with the dense ``ΔW[o, j] = B[j mod r, o]`` built per backward (an
``(out, in)`` add, independent of the batch). Same math; measured ~3-10% less time per adapted layer (1 thread).
"""

from __future__ import annotations

from typing import Any

import torch

from .blocks import shard_sum, shared_delta


class SharedBlockLinear(torch.autograd.Function):
    """``y = x Wᵀ + b + shard_sum(x, r) @ B`` for a frozen ``W: (out, in)`` (and ``b: (out,)`` or None) and
    ``B: (r, out)``; ``x: (..., in) -> (..., out)``. Gradients for ``x``, ``b`` (when it trains) and ``B``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                block: torch.Tensor) -> torch.Tensor:
        s = shard_sum(x, block.shape[0]).reshape(-1, block.shape[0])  # (N, r)
        flat = x.reshape(-1, x.shape[-1])
        out = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        out.addmm_(s, block)
        ctx.save_for_backward(s, weight, block)
        ctx.in_shape = x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None,
                                                         torch.Tensor | None]:
        s, weight, block = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = grad_bias = grad_block = None
        if ctx.needs_input_grad[0]:
            full = weight + shared_delta(block, weight.shape[1], weight.shape[0])  # W + ΔW: (out, in)
            grad_x = (g @ full).view(ctx.in_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_block = s.t() @ g
        return grad_x, None, grad_bias, grad_block


def can_use(x: torch.Tensor, weight: torch.Tensor, block: torch.Tensor, plain_linear: bool, dropout: bool) -> bool:
    """Whether :class:`SharedBlockLinear` serves this call: autograd on, eager, an exact ``nn.Linear`` without hooks
    whose weight is frozen, no dropout, and one dtype for ``x``, ``W`` and ``B``."""
    return (plain_linear and not dropout and torch.is_grad_enabled() and not weight.requires_grad
            and x.dtype == weight.dtype == block.dtype and not torch.compiler.is_compiling())


def shared_block_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        block: torch.Tensor) -> torch.Tensor:
    """:class:`SharedBlockLinear` applied (see there)."""
    return SharedBlockLinear.apply(x, weight, bias, block)
