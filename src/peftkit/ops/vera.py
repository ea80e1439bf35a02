"""The VeRA update of a linear output, as a plain reference and as a lean autograd function.

Conventions: ``x: (..., in)``, shared projection slices ``A: (r, in)``, ``B: (out, r)``, vectors ``lambda_d: (r,)``,
``lambda_b: (out,)``, ``result: (..., out)``; the update is ``lambda_b ⊙ (B (lambda_d ⊙ (A x)))``.
"""

from __future__ import annotations

from typing import Any

import torch


def vera_update_reference(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
    """Plain out-of-place ``result + lambda_b * ((lambda_d * (x @ A.T)) @ B.T)`` (the reference's order of ops),
    computed in ``lambda_d``'s dtype and cast back to ``result.dtype``."""
    x = x.to(lambda_d.dtype)
    delta = lambda_b * torch.nn.functional.linear(lambda_d * torch.nn.functional.linear(x, A), B)
    return (result + delta).to(result.dtype)


class _VeraUpdate(torch.autograd.Function):
    """``result += lambda_b ⊙ ((lambda_d ⊙ (x A^T)) B^T)`` in place (``addcmul_``: no scaled copy, no new output).
    Keeps ``h = x A^T: (N, r)`` and, with ``keep_product``, ``t = (lambda_d ⊙ h) B^T: (N, out)`` for the vectors'
    gradients (the reference keeps both, plus its scaled copies); without it, ``lambda_b``'s gradient is recomputed
    as ``rowsum(B ⊙ (g^T (lambda_d ⊙ h)))`` (one more ``(out, N) @ (N, r)`` product, no ``(N, out)`` memory).
    ``A``/``B`` are frozen: no gradient."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                lambda_d: torch.Tensor, lambda_b: torch.Tensor, keep_product: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ A.t()  # (N, r)
        hd = h * lambda_d  # (N, r)
        out2d = result.view(-1, result.shape[-1])
        if keep_product:
            t = hd @ B.t()  # (N, out)
            out2d.addcmul_(t, lambda_b)
        else:
            t = None
            out2d.addmm_(hd, (lambda_b.unsqueeze(-1) * B).t())
        ctx.mark_dirty(result)
        ctx.save_for_backward(h, t, A, B, lambda_d, lambda_b)
        ctx.x_shape = x.shape
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, t, A, B, lambda_d, lambda_b = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        need_x, need_d, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        grad_x = grad_d = grad_b = None
        if need_x or need_d:
            g_hd = g2 @ (lambda_b.unsqueeze(-1) * B)  # (N, r)
            if need_d:
                grad_d = (g_hd * h).sum(0)
            if need_x:
                grad_x = ((g_hd * lambda_d) @ A).reshape(ctx.x_shape)
        if need_b:
            grad_b = (g2 * t).sum(0) if t is not None else ((g2.t() @ (h * lambda_d)) * B).sum(1)  # (out,)
        return grad, grad_x, None, None, grad_d, grad_b, None


def can_add_vera_inplace(result: torch.Tensor, x: torch.Tensor, lambda_d: torch.Tensor) -> bool:
    """Whether :func:`add_vera_` may write into ``result``: one dtype for ``result``, ``x`` and the vectors, a
    contiguous result that is not a view and not a leaf requiring grad (the caller guarantees that no autograd node
    saved ``result``: true for the outputs of linear layers)."""
    if not (result.dtype == x.dtype == lambda_d.dtype) or not result.is_contiguous() or result._base is not None:
        return False
    return not (result.requires_grad and result.is_leaf)


def add_vera_(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, lambda_d: torch.Tensor,
              lambda_b: torch.Tensor, keep_product: bool = True) -> torch.Tensor:
    """:func:`vera_update_reference` written into ``result`` (returned) when :func:`can_add_vera_inplace` allows,
    else the reference. Equal up to rounding. ``keep_product``: see ``_VeraUpdate`` (time against memory)."""
    if not can_add_vera_inplace(result, x, lambda_d):
        return vera_update_reference(result, x, A, B, lambda_d, lambda_b)
    return _VeraUpdate.apply(result, x, A.to(lambda_d.dtype), B.to(lambda_d.dtype), lambda_d, lambda_b, keep_product)
