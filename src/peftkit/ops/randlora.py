"""The RandLoRA update of a linear output, as a plain reference and as a lean autograd function.

Conventions for one layer with ``W: (out, in)``, ``m = min(in, out)``, ``M = max(in, out)``, ``nb`` bases of rank
``r`` and ``J = r * nb``: the shared bases' slices ``A: (r, m)`` and ``B: (M, J)`` (column ``b * r + k`` is basis
``b``'s column ``k``; a strided view of the shared ``(max_dim, NB, r)`` tensor, never copied), the trainable
``lam: (r, nb)`` and ``gamma: (nb, m)``. The scaled basis is ``Af: (J, m)``, row ``k * nb + b`` =
``lam[k, b] * A[k] * gamma[b]`` (the reference's flattening order, which pairs ``Af``'s row ``j`` with ``B``'s column
``j`` in another order: a fixed pairing of random bases, kept for bit-compatible files). The update is
``ΔW = scaling * B Af`` when ``in == m`` and ``scaling * (B Af)^T`` otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F


def scaled_basis(A: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``Af: (r * nb, m)`` from ``A: (r, m)``, ``lam: (r, nb)``, ``gamma: (nb, m)`` (row ``k * nb + b``)."""
    r, nb = lam.shape
    return (lam.unsqueeze(-1) * A.unsqueeze(1) * gamma.unsqueeze(0)).reshape(r * nb, -1)


def randlora_update_reference(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              lam: torch.Tensor, gamma: torch.Tensor, scaling: float, in_is_min: bool
                              ) -> torch.Tensor:
    """Plain out-of-place ``result + x ΔW^T`` (the reference's two linears), computed in ``lam``'s dtype and cast
    back to ``result.dtype``. ``x: (..., in)``, ``result: (..., out)``."""
    af = scaled_basis(A.to(lam.dtype), lam, gamma)
    b = B.to(lam.dtype)
    x = x.to(lam.dtype)
    delta = F.linear(F.linear(x, af), b) if in_is_min else F.linear(F.linear(x, b.t()), af.t())
    return (result + delta * scaling).to(result.dtype)


def _mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * (a @ b)`` with the scale folded into the product (no extra pass; ``beta=0`` ignores the input)."""
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=alpha)


class _RandLoraUpdate(torch.autograd.Function):
    """``result += scaling * x ΔW^T`` in place (``addmm_``, the scale folded in), never forming ``ΔW``.

    ``in_is_min``: ``h = x Af^T: (N, J)``, then ``result += s h B^T``; keeps only ``x`` (which the base linear keeps
    anyway) and recomputes ``Af: (J, m)`` in backward. Otherwise ``h = x B: (N, J)``, ``result += s h Af``; keeps
    ``h`` (as the reference). The reference keeps ``Af`` per layer and makes three output-sized temporaries.
    ``A`` / ``B`` are frozen: no gradient."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                lam: torch.Tensor, gamma: torch.Tensor, scaling: float, in_is_min: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out2d = result.view(-1, result.shape[-1])
        af = scaled_basis(A, lam, gamma)
        if in_is_min:
            out2d.addmm_(x2 @ af.t(), B.t(), alpha=scaling)
            ctx.save_for_backward(x2, A, B, lam, gamma)
        else:
            h = x2 @ B
            out2d.addmm_(h, af, alpha=scaling)
            ctx.save_for_backward(h, A, B, lam, gamma)
        ctx.mark_dirty(result)
        ctx.scaling, ctx.in_is_min, ctx.x_shape = scaling, in_is_min, x.shape
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kept, A, B, lam, gamma = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        s = ctx.scaling
        af = scaled_basis(A, lam, gamma)
        if ctx.in_is_min:
            gh = _mm(g2, B, s)  # (N, J): gradient of h = x Af^T
            grad_af = gh.t().mm(kept)  # (J, m)
            grad_x = gh.mm(af).reshape(ctx.x_shape) if ctx.needs_input_grad[1] else None
        else:
            grad_af = _mm(kept.t(), g2, s)  # (J, m)
            grad_x = _mm(g2, af.t(), s).mm(B.t()).reshape(ctx.x_shape) if ctx.needs_input_grad[1] else None
        grad_lam, grad_gamma = _basis_grads(grad_af, A, lam, gamma, ctx.needs_input_grad[4], ctx.needs_input_grad[5])
        return grad, grad_x, None, None, grad_lam, grad_gamma, None, None


def _folded_weight(W: torch.Tensor, af: torch.Tensor, B: torch.Tensor, scaling: float, in_is_min: bool
                   ) -> torch.Tensor:
    """``W + ΔW: (out, in)`` (``W`` as ``(out, in)``, possibly a transposed view) from ``Af: (J, m)``: one
    ``(M, J) @ (J, m)`` product."""
    if in_is_min:
        return torch.addmm(W, B, af, alpha=scaling)
    return torch.addmm(W, af.t(), B.t(), alpha=scaling)


class _RandLoraFolded(torch.autograd.Function):
    """``x (W + ΔW)^T + bias`` for a frozen ``W: (out, in)``: one product with the folded weight instead of the base
    product plus two adapter products. Keeps only ``x`` (as the base linear would); backward picks, per layer, the
    cheaper of two equal formulas (:func:`_folded_backward`). In units of ``N m J`` products (``N`` rows, ``J ≈ m``):
    forward ``M m² + N M m`` against the reference's ``2 N M m + N m²``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, scaling: float, in_is_min: bool
                ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        weight = _folded_weight(W, scaled_basis(A, lam, gamma), B, scaling, in_is_min)
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2.mm(weight.t())
        ctx.save_for_backward(x2, W, A, B, lam, gamma)
        ctx.scaling, ctx.in_is_min, ctx.x_shape = scaling, in_is_min, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, W, A, B, lam, gamma = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x, grad_af = _folded_backward(g2, x2, W, A, B, lam, gamma, ctx.scaling, ctx.in_is_min,
                                           ctx.needs_input_grad[0])
        grad_bias = g2.sum(0) if ctx.needs_input_grad[2] else None
        grad_lam, grad_gamma = _basis_grads(grad_af, A, lam, gamma, ctx.needs_input_grad[5], ctx.needs_input_grad[6])
        grad_x = grad_x.view(ctx.x_shape) if grad_x is not None else None
        return grad_x, None, grad_bias, None, None, grad_lam, grad_gamma, None, None


def _folded_backward(g2: torch.Tensor, x2: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     lam: torch.Tensor, gamma: torch.Tensor, s: float, in_is_min: bool, need_x: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(dx: (N, in) or None, dAf: (J, m))`` of ``y = x (W + ΔW)^T``. With ``N > M`` rows the gradient of the
    folded weight ``dW = g^T x`` is the cheaper route to ``dAf`` (``dAf = s B^T dW``, or ``s B^T dW^T``) and ``dx``
    uses the recomputed folded weight; with fewer rows the low-rank route is (``in == m``: ``gh = s g B``,
    ``dx = g W + gh Af``, ``dAf = gh^T x``; else ``dAf = s (x B)^T g`` and ``dx`` through the folded weight)."""
    af = scaled_basis(A, lam, gamma)
    if g2.shape[0] > B.shape[0]:  # N > M
        grad_w = g2.t().mm(x2)  # (out, in)
        grad_af = _mm(B.t(), grad_w if in_is_min else grad_w.t(), s)
    elif in_is_min:
        gh = _mm(g2, B, s)  # (N, J)
        grad_af = gh.t().mm(x2)
        return (g2.mm(W).addmm_(gh, af) if need_x else None), grad_af
    else:
        grad_af = _mm(x2.mm(B).t(), g2, s)  # (J, m)
    grad_x = g2.mm(_folded_weight(W, af, B, s, in_is_min)) if need_x else None
    return grad_x, grad_af


def _basis_grads(grad_af: torch.Tensor, A: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, need_lam: bool,
                 need_gamma: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(d lam: (r, nb), d gamma: (nb, m))`` from ``d Af: (J, m)`` (consumed: scaled in place by ``A``)."""
    r, nb = lam.shape
    t = grad_af.view(r, nb, -1).mul_(A.unsqueeze(1))  # (r, nb, m): dAf ⊙ A
    grad_lam = torch.einsum("kbi,bi->kb", t, gamma) if need_lam else None
    grad_gamma = torch.einsum("kbi,kb->bi", t, lam) if need_gamma else None
    return grad_lam, grad_gamma


def randlora_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                    lam: torch.Tensor, gamma: torch.Tensor, scaling: float, in_is_min: bool) -> torch.Tensor:
    """``x (W + ΔW)^T + bias`` (``x: (..., in)``, ``W: (out, in)``, frozen) through :class:`_RandLoraFolded`; equal
    up to rounding to the base output plus :func:`randlora_update_reference`."""
    return _RandLoraFolded.apply(x, W, bias, A.to(lam.dtype), B.to(lam.dtype), lam, gamma, scaling, in_is_min)


def folding_pays(rows: int, lam: torch.Tensor) -> bool:
    """Whether the folded product is cheaper than the low-rank one: ``rows >= J = r * nb`` (see
    :class:`_RandLoraFolded`)."""
    return rows >= lam.numel()


def can_add_randlora_inplace(result: torch.Tensor, x: torch.Tensor, lam: torch.Tensor) -> bool:
    """Whether :func:`add_randlora_` may write into ``result``: one dtype for ``result``, ``x`` and the trainable
    tensors, a contiguous result that is not a view and not a leaf requiring grad (the caller guarantees that no
    autograd node saved ``result``: true for the outputs of linear layers)."""
    if not (result.dtype == x.dtype == lam.dtype) or not result.is_contiguous() or result._base is not None:
        return False
    return not (result.requires_grad and result.is_leaf)


def add_randlora_(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, lam: torch.Tensor,
                  gamma: torch.Tensor, scaling: float, in_is_min: bool) -> torch.Tensor:
    """:func:`randlora_update_reference` written into ``result`` (returned) when :func:`can_add_randlora_inplace`
    allows, else the reference. Equal up to rounding."""
    if not can_add_randlora_inplace(result, x, lam):
        return randlora_update_reference(result, x, A, B, lam, gamma, scaling, in_is_min)
    return _RandLoraUpdate.apply(result, x, A.to(lam.dtype), B.to(lam.dtype), lam, gamma, scaling, in_is_min)
