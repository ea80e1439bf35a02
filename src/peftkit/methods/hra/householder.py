"""Pure tensor math of HRA: a product of Householder reflections in compact form, applied to activations or weights.

For ``u: (n, r)`` with columns ``u_1 … u_r`` the reference builds the dense ``R = H_1 H_2 ⋯ H_r`` with
``H_i = I - 2 û_i û_iᵀ`` (``û_i = u_i / |u_i|``), one ``(n, n)`` product per column. The same matrix has the compact
("UT transform") form ``R = I - P Qᵀ`` with ``Q = Û: (n, r)``, ``S = striu(ÛᵀÛ) + I/2: (r, r)`` (upper triangular)
and ``P = Û S⁻¹: (n, r)``; with Gram-Schmidt (``apply_GS``) ``Q`` is the orthonormalised ``u`` and ``P = 2Q``
(``R = I - 2QQᵀ``). Applying ``R`` then costs two rank-``r`` products instead of an ``(n, n)`` matrix:
``x Rᵀ = x - (x Q) Pᵀ`` for rows ``x: (..., n)``, ``W R = W - (W P) Qᵀ`` and ``W Rᵀ = W - (W Q) Pᵀ``.
"""

from __future__ import annotations

import torch


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns ``(n, r)`` from ``u: (n, r)`` by modified Gram-Schmidt, in the reference's order (each
    column minus its projections on the previous normalised ones, one at a time, then normalised)."""
    cols = [u[:, 0] / u[:, 0].norm()]
    for i in range(1, u.shape[1]):
        ui = u[:, i]
        for q in cols:
            ui = ui - (q @ ui) * q
        cols.append(ui / ui.norm())
    return torch.stack(cols, dim=1)


def factor_dtype(u: torch.Tensor) -> torch.dtype:
    """The dtype HRA's factors are computed in: float64 (float32 on MPS, which has no float64)."""
    return torch.float32 if u.device.type == "mps" else torch.float64


def householder_factors(u: torch.Tensor, apply_gs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)``, both ``(n, r)`` in :func:`factor_dtype`, with ``R = H_1 ⋯ H_r = I - P Qᵀ`` (module docstring).

    Computed in float64: O(n·r²), negligible next to applying them. Together with :func:`reflect_rows` this makes a
    paired-column init (``u_2k = u_2k-1``, ``R = I``) leave the inputs unchanged to the bit; in float32 the
    normalised columns' ``q·q != 1`` and fused multiply-adds leave ~1 ulp, which deep models amplify (the
    reference's dense float32 product changes a tiny T5's outputs by ~1e-6 at init)."""
    work = u.to(factor_dtype(u))
    if apply_gs:
        q = gram_schmidt(work)
        return 2 * q, q
    q = work / work.norm(dim=0)
    s = torch.triu(q.T @ q, diagonal=1)
    s = s + 0.5 * torch.eye(s.shape[0], device=s.device, dtype=s.dtype)
    return torch.linalg.solve_triangular(s, q, upper=True, left=False), q  # p s = q


def reflect_rows(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``x Rᵀ = x - (x Q) Pᵀ`` for ``x: (..., n)``, ``P, Q: (n, r)``, in ``x``'s dtype: O(rows · n · r), no
    ``(n, n)`` matrix. ``x Q`` runs in ``x``'s dtype; the correction ``(x Q) Pᵀ`` in ``P``'s (float64), rounded
    once, so an exactly cancelling ``P`` (identity ``R``) gives a correction far below ``x``'s last bit."""
    z = x @ q.to(x.dtype)  # (..., r)
    return x - (z.to(p.dtype) @ p.T).to(x.dtype)


def rotate_weight(weight: torch.Tensor, p: torch.Tensor, q: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``W R = W - (W P) Qᵀ`` (``transpose``: ``W Rᵀ = W - (W Q) Pᵀ``) for ``W: (out, n)``, in the factors' dtype."""
    first, second = (q, p) if transpose else (p, q)
    w = weight.to(p.dtype)
    return torch.addmm(w, w @ first, second.T, alpha=-1)


def dense_reflection(u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """``R: (n, n)`` as a dense matrix (``I - P Qᵀ``): for inspection and ``get_delta_weight``-style consumers."""
    p, q = householder_factors(u, apply_gs)
    eye = torch.eye(u.shape[0], device=u.device, dtype=p.dtype)
    return (eye - p @ q.T).to(u.dtype)
