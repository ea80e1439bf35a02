"""GraLoRA's tensor math: pure functions of tensors (no modules, no state).

Notation for one layer with ``W: (out, in)``, ``k = gralora_k`` blocks per side, ``i = in / k``, ``o = out / k``,
``s = r / k``: ``A: (k, i, r)`` (``A[n]`` reads input block ``n``), ``B: (k, r, o)`` (``B[j]`` writes output block
``j``), optional hybrid LoRA ``A_g: (h, in)``, ``B_g: (out, h)``. With ``x_n`` the ``n``-th input block of ``x`` and
``h_n = x_n A[n]: (..., r)`` split into ``k`` chunks ``h_n[j]`` of ``s`` features, output block ``j`` of the update is
``scaling · [h_0[j], …, h_{k-1}[j]] B[j]`` (the reference's einsum / permute / einsum), plus
``scaling · x A_gᵀ B_gᵀ``.
"""

from __future__ import annotations

from typing import Any

import torch

from ...ops.lowrank import can_update_inplace


def swap_blocks(h: torch.Tensor, k: int) -> torch.Tensor:
    """``h: (k, M, r)`` indexed ``[n, m, (j, s)]`` -> contiguous ``(k, M, r)`` indexed ``[j, m, (n, s)]`` (an
    involution: applying it twice gives ``h`` back)."""
    kk, m, r = h.shape
    return h.view(kk, m, k, r // k).permute(2, 1, 0, 3).reshape(kk, m, r)


def gralora_update_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                             A_general: torch.Tensor | None = None, B_general: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """Plain autograd form of the update: ``x: (..., in) -> (..., out)`` in ``A``'s dtype (the reference's einsums),
    ``scaling`` applied; the hybrid LoRA part added when ``A_general`` / ``B_general`` are given."""
    k, i, r = A.shape
    x = x.to(A.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k, i)
    h = torch.einsum("mni,nir->mnr", x2, A)  # (M, k_n, r)
    h = h.view(-1, k, k, r // k).transpose(1, 2).reshape(-1, k, r)  # (M, k_j, (n, s))
    out = torch.einsum("mjr,jro->mjo", h, B).reshape(*lead, -1)
    if A_general is not None and B_general is not None:
        out = out + torch.nn.functional.linear(torch.nn.functional.linear(x, A_general), B_general)
    return out * scaling


def gralora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, A_general: torch.Tensor | None = None,
                  B_general: torch.Tensor | None = None) -> torch.Tensor:
    """``ΔW: (out, in)`` in ``A``'s dtype: block ``(j, n)`` is ``(A[n][:, j·s:(j+1)·s] B[j][n·s:(n+1)·s])ᵀ``, plus
    ``B_general A_general``; times ``scaling``. One einsum over the ``k x k`` blocks (the reference scatters ``A``
    into a ``(in, k, r)`` zero-padded tensor first)."""
    k, i, r = A.shape
    o, s = B.shape[-1], r // k
    blocks = torch.einsum("nijs,jnso->joni", A.view(k, i, k, s), B.view(k, k, s, o))  # (k_j, o, k_n, i)
    delta = blocks.reshape(k * o, k * i)
    if A_general is not None and B_general is not None:
        delta = delta + B_general @ A_general
    return delta * scaling


def can_add_gralora_inplace(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether :func:`add_gralora_` may write into ``result``: ``ops.lowrank.can_update_inplace`` (one dtype, a
    contiguous result that autograd allows to change), ``x`` in that dtype too, and ``result`` not a view (the
    autograd function marks it dirty)."""
    return x.dtype == A.dtype and result._base is None and can_update_inplace(result, A)


def add_gralora_(result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                 A_general: torch.Tensor | None = None, B_general: torch.Tensor | None = None) -> torch.Tensor:
    """``result + gralora_update_reference(x, ...)``: written into ``result``'s memory by :class:`GraloraUpdate` (a
    tensor of ``result``'s shape on that memory returned) when :func:`can_add_gralora_inplace` allows and not
    compiling (dynamo traces the plain form and fuses it), else out of place. Equal up to rounding."""
    target = None if torch.compiler.is_compiling() else _whole_base(result)
    if target is None or not can_add_gralora_inplace(target, x, A):
        delta = gralora_update_reference(x, A, B, scaling, A_general, B_general)
        return result + delta.to(result.dtype)
    return GraloraUpdate.apply(target, x, A, B, scaling, A_general, B_general).view(result.shape)


def _whole_base(result: torch.Tensor) -> torch.Tensor:
    """``result``, or the contiguous tensor of which it is a reshaped view of the same memory (GPT-2's ``Conv1D``
    returns ``addmm(...).view(...)``): that tensor is what the in-place update may write (``result`` is then unused)."""
    base = result._base
    if (base is not None and base.is_contiguous() and result.is_contiguous() and base.numel() == result.numel()
            and base.data_ptr() == result.data_ptr()):
        return base
    return result


def _cols(t: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The ``k`` equal column blocks of ``t: (M, c)`` as views ``(M, c / k)``: strided operands that BLAS reads and
    writes in place (leading dimension ``c``)."""
    return t.split(t.shape[-1] // k, dim=-1)


class GraloraUpdate(torch.autograd.Function):
    """``result += scaling · (GraLoRA update of x [+ hybrid LoRA])`` in place (``result: (..., out)``, ``x:
    (..., in)``): ``k`` products ``x_n A[n]`` into one ``(k, M, r)`` tensor, a block swap of it (``M·r`` values) and
    ``k`` products added straight into the column blocks of ``result`` (no output-sized temporary; the reference
    makes three). Keeps ``x`` (already kept by the base layer) and the swapped ``(k, M, r)`` activations (plus the
    hybrid ``(M, h)``) for backward; the backward writes the input gradient block by block into one ``(M, in)``
    tensor. Checked against :func:`gralora_update_reference` (values and gradients) in tests/test_gralora.py."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                A_general: torch.Tensor | None, B_general: torch.Tensor | None) -> torch.Tensor:
        k, _, r = A.shape
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        out2d = result.view(-1, result.shape[-1])  # (M, out)
        h = x2.new_empty(k, x2.shape[0], r)
        for x_n, a_n, h_n in zip(_cols(x2, k), A, h):
            torch.mm(x_n, a_n, out=h_n)  # h[n] = x_n A[n]
        hs = swap_blocks(h, k)  # (k_j, M, r)
        for hs_j, b_j, out_j in zip(hs, B, _cols(out2d, k)):
            out_j.addmm_(hs_j, b_j, alpha=scaling)
        hg = None
        if A_general is not None and B_general is not None:
            hg = x2 @ A_general.t()  # (M, h)
            out2d.addmm_(hg, B_general.t(), alpha=scaling)
        ctx.mark_dirty(result)
        ctx.save_for_backward(x, A, B, hs, A_general, B_general, hg)
        ctx.scaling = scaling
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, A, B, hs, A_general, B_general, hg = ctx.saved_tensors
        need_x, need_a, need_b, _, need_ag, need_bg = ctx.needs_input_grad[1:7]
        k, scaling = A.shape[0], ctx.scaling
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, out)
        x2 = x.reshape(-1, x.shape[-1])
        grad_x2 = grad_a = grad_b = grad_ag = grad_bg = None
        if need_b:  # dB[j] = scaling · hs[j]ᵀ g_j
            grad_b = torch.empty_like(B)
            for hs_j, g_j, gb_j in zip(hs, _cols(g2, k), grad_b):
                torch.mm(hs_j.t(), g_j, out=gb_j)
            grad_b.mul_(scaling)
        if need_x or need_a:
            g_hs = torch.empty_like(hs)  # d hs[j] = scaling · g_j B[j]ᵀ
            for g_j, b_j, gh_j in zip(_cols(g2, k), B, g_hs):
                torch.mm(g_j, b_j.t(), out=gh_j)
            g_h = swap_blocks(g_hs.mul_(scaling), k)  # (k_n, M, r)
            if need_a:  # dA[n] = x_nᵀ dh[n]
                grad_a = torch.empty_like(A)
                for x_n, gh_n, ga_n in zip(_cols(x2, k), g_h, grad_a):
                    torch.mm(x_n.t(), gh_n, out=ga_n)
            if need_x:  # dx_n = dh[n] A[n]ᵀ, written into its columns of one (M, in) tensor
                grad_x2 = x2.new_empty(x2.shape)
                for gh_n, a_n, gx_n in zip(g_h, A, _cols(grad_x2, k)):
                    gx_n.addmm_(gh_n, a_n.t(), beta=0)
        if hg is not None:
            g_hg = torch.mm(g2, B_general).mul_(scaling) if (need_x or need_ag) else None  # (M, h)
            if need_bg:
                grad_bg = torch.mm(g2.t(), hg).mul_(scaling)
            if need_ag:
                grad_ag = g_hg.t() @ x2
            if need_x:
                grad_x2.addmm_(g_hg, A_general)
        grad_x = None if grad_x2 is None else grad_x2.view(x.shape)
        return grad, grad_x, grad_a, grad_b, None, grad_ag, grad_bg
