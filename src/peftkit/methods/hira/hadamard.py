"""HiRA's linear update ``x (W ⊙ (s + B A))ᵀ`` as one autograd function that keeps no dense weight for backward.

The reference computes ``F.linear(x, W ⊙ (B A))`` beside the base layer's ``F.linear(x, W)``: two ``(N, out)``
products per forward, three in backward, and autograd keeps the dense ``W ⊙ (B A): (out, in)`` of every adapted
layer alive from the forward to the backward. :class:`HadamardLinear` computes ``y = x (W ⊙ (s + P))ᵀ + b`` with
``P = B A`` and ``s = 1`` (base and update in one product) or ``s = 0`` (the update alone, e.g. after dropout),
saves ``x``, ``A`` and ``B`` only and rebuilds ``P`` in backward (an ``(out, r) @ (r, in)`` product, small next to
the ``(N, out) @ (out, in)`` ones). :func:`plain_hadamard_linear` is the same math through plain autograd (the
reference for tests, and the path under ``torch.compile`` and without autograd).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def plain_hadamard_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hira_a: torch.Tensor,
                          hira_b: torch.Tensor, base_scale: float) -> torch.Tensor:
    """``x: (..., in) -> (..., out)``: ``x (W ⊙ (s + B A))ᵀ + b`` for ``W: (out, in)``, ``A: (r, in)``,
    ``B: (out, r)``, ``s = base_scale``; one dense ``(out, in)`` temporary."""
    product = hira_b @ hira_a
    if base_scale:
        product = product + base_scale
    return F.linear(x, weight * product, bias)


class HadamardLinear(torch.autograd.Function):
    """``y = x (W ⊙ (s + B A))ᵀ + b`` (see the module docstring); gradients for ``x``, ``b``, ``A`` and ``B``
    (``W`` is frozen). ``x: (..., in)``, ``W: (out, in)`` (any strides), ``b: (out,)`` or None, ``A: (r, in)``,
    ``B: (out, r)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hira_a: torch.Tensor,
                hira_b: torch.Tensor, base_scale: float) -> torch.Tensor:
        effective = _effective(weight, hira_a, hira_b, base_scale)
        out = F.linear(x, effective, bias)
        del effective
        ctx.save_for_backward(x, weight, hira_a, hira_b)
        ctx.base_scale = base_scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None,
                                                         torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, hira_a, hira_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _effective(weight, hira_a, hira_b, ctx.base_scale)).view(x.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_p = (g.t() @ x.reshape(-1, x.shape[-1])).mul_(weight)  # dL/dP = (gᵀ x) ⊙ W: (out, in)
            if ctx.needs_input_grad[3]:
                grad_a = hira_b.t() @ grad_p
            if ctx.needs_input_grad[4]:
                grad_b = grad_p @ hira_a.t()
        return grad_x, None, grad_bias, grad_a, grad_b, None


def _effective(weight: torch.Tensor, hira_a: torch.Tensor, hira_b: torch.Tensor, base_scale: float) -> torch.Tensor:
    """``W ⊙ (s + B A): (out, in)``, built in one buffer."""
    product = hira_b @ hira_a
    if base_scale:
        product.add_(base_scale)
    return product.mul_(weight)


def can_use(x: torch.Tensor, weight: torch.Tensor, hira_a: torch.Tensor) -> bool:
    """Whether :class:`HadamardLinear` serves this call: autograd on, eager, a frozen ``W``, one dtype for ``x``,
    ``W`` and the factors."""
    return (torch.is_grad_enabled() and not weight.requires_grad and x.dtype == weight.dtype == hira_a.dtype
            and not torch.compiler.is_compiling())


def hadamard_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, hira_a: torch.Tensor,
                    hira_b: torch.Tensor, base_scale: float) -> torch.Tensor:
    """``x (W ⊙ (s + B A))ᵀ + b``: :class:`HadamardLinear` when :func:`can_use`, else the plain autograd path."""
    if can_use(x, weight, hira_a):
        return HadamardLinear.apply(x, weight, bias, hira_a, hira_b, base_scale)
    return plain_hadamard_linear(x, weight, bias, hira_a, hira_b, base_scale)
