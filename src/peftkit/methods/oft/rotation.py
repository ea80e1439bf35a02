"""Pure tensor math of OFT: packed skew-symmetric vectors -> orthogonal blocks, and block rotations.

Conventions (those of the reference's checkpoints):

- an adapter stores ``vec: (n, b·(b-1)/2)``: the strict upper triangle (row-major, ``torch.triu_indices(b, b, 1)``)
  of ``n`` skew-symmetric blocks ``Q = U - Uᵀ: (b, b)``; ``n`` is the number of blocks ``r`` (1 with
  ``block_share``);
- each block becomes ``R = (I - Q)(I + Q)⁻¹`` (Cayley), or, with ``use_cayley_neumann``, the truncated series
  ``I + 2Q + 2Q² + ... + 2Q^(t-2) + Q^max(3, t-1)`` of ``t = num_cayley_neumann_terms`` (for ``t > 2``; ``t = 2``:
  ``I + 2Q``; ``t <= 1``: ``I``): the terms the reference's loop adds, so ``t = 3`` and ``t = 4`` agree;
- a vector ``x: (..., r·b)`` (a row) is rotated blockwise, ``x_i ↦ x_i @ R_i`` for its ``i``-th slice of ``b``
  features: ``x @ blockdiag(R_1, ..., R_r)``.

No ``nn.Module`` and no state here; each fast path has a plain reference beside it (``*_reference``).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def _triu(block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
    return rows, cols


def skew(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """``vec: (n, b(b-1)/2) -> Q: (n, b, b)`` with ``Q = U - Uᵀ``, ``U`` the strict upper triangle holding ``vec``."""
    rows, cols = _triu(block_size, vec.device)
    upper = vec.new_zeros(vec.shape[0], block_size, block_size)
    upper = _scatter_upper(upper, vec, rows, cols)
    return upper - upper.transpose(-2, -1)


def _scatter_upper(upper: torch.Tensor, vec: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``upper[:, rows, cols] = vec`` out of place (differentiable in ``vec``): ``upper`` is a zero ``(n, b, b)``."""
    b = upper.shape[-1]
    flat = upper.reshape(upper.shape[0], b * b)
    return flat.index_add(1, rows * b + cols, vec).reshape(upper.shape)


def unskew(matrix: torch.Tensor) -> torch.Tensor:
    """``Q: (n, b, b) -> (n, b(b-1)/2)``: the strict upper triangle, row-major (inverse of :func:`skew`)."""
    rows, cols = _triu(matrix.shape[-1], matrix.device)
    return matrix[:, rows, cols]


def cayley(vec: torch.Tensor, block_size: int, use_neumann: bool, num_terms: int) -> torch.Tensor:
    """Orthogonal (exact) or nearly orthogonal (Neumann) blocks ``R: (n, b, b)`` from ``vec: (n, b(b-1)/2)``."""
    q = skew(vec, block_size)
    eye = torch.eye(block_size, device=vec.device, dtype=vec.dtype)
    if not use_neumann:
        # R (I + Q) = I - Q
        return torch.linalg.solve(eye + q, eye - q, left=False)
    if num_terms <= 1:
        return eye.expand_as(q).clone()
    out = torch.add(eye, q, alpha=2.0)
    if num_terms == 2:
        return out
    power = torch.bmm(q, q)
    out = torch.add(out, power, alpha=2.0)
    for _ in range(3, num_terms - 1):
        power = torch.bmm(power, q)
        out = torch.add(out, power, alpha=2.0)
    return out + torch.bmm(power, q)


def project_coft(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT: each block's ``Q`` scaled into the Frobenius ball of radius ``eps / sqrt(n)`` (kept when inside it).

    ``vec: (n, b(b-1)/2)``, returns the same shape. Matches the reference's ``_project_batch`` (whose "identity" is
    the zero matrix, so the ball is centred on ``Q = 0``, i.e. on ``R = I``)."""
    q = skew(vec, block_size)
    radius = eps / float(vec.shape[0]) ** 0.5
    norm = torch.linalg.matrix_norm(q, keepdim=True)
    projected = torch.where(norm <= radius, q, q * (radius / norm))
    return unskew(projected)


def block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout of OFT (training): ``int(p·n)`` randomly chosen blocks of ``blocks: (n, b, b)`` become
    the identity (one shared block, ``n = 1``, is kept)."""
    n, b, _ = blocks.shape
    dropped = int(p * n)
    if n == 1 or dropped == 0:
        return blocks
    mask = torch.zeros(n, dtype=torch.bool, device=blocks.device)
    mask[torch.randperm(n, device=blocks.device)[:dropped]] = True
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    return torch.where(mask.view(n, 1, 1), eye, blocks)


def _blocked_bmm(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x: (N, r·b)``, ``blocks: (r, b, b) -> (N, r·b)``: slice ``i`` of each row times ``blocks[i]``, one ``bmm``
    over the ``r`` strided slices written straight into the ``(N, r·b)`` result (no ``(r, N, b)`` temporary and no
    transposing copy: one buffer of the output's size, the fewest bytes a fresh process has to fault in)."""
    n, r, b = x.shape[0], blocks.shape[0], blocks.shape[1]
    out = x.new_empty(n, r, b)
    torch.bmm(x.view(n, r, b).transpose(0, 1), blocks, out=out.transpose(0, 1))
    return out.view(n, r * b)


class _BlockRotate(torch.autograd.Function):
    """``y = x @ blockdiag(R_1..R_r)`` for ``x: (N, r·b)``, ``R: (r, b, b)``, saving only ``x`` and ``R``.

    One ``bmm`` over the ``r`` blocks (the ``(r·b, r·b)`` block-diagonal matrix is never formed). Backward
    recomputes the blocked view of ``x`` instead of keeping a transposed copy of it, as ``einsum`` would."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, blocks)
        return _blocked_bmm(x, blocks)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, blocks = ctx.saved_tensors
        n, r, b = x.shape[0], blocks.shape[0], blocks.shape[1]
        grad_blocks = grad.reshape(n, r, b).transpose(0, 1)  # (r, N, b)
        grad_x = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_x = _blocked_bmm(grad.reshape(n, r * b), blocks.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_r = torch.bmm(x.view(n, r, b).permute(1, 2, 0), grad_blocks)  # (r, b, N) @ (r, N, b)
        return grad_x, grad_r


def block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x: (..., r·b) -> (..., r·b)``, each slice ``x[..., i·b:(i+1)·b]`` times ``blocks[i]: (b, b)`` from the right;
    ``blocks: (r, b, b)`` or ``(1, b, b)`` (one block shared by every slice)."""
    features = x.shape[-1]
    b = blocks.shape[-1]
    if blocks.shape[0] != features // b:
        blocks = blocks.expand(features // b, b, b)
    flat = x.reshape(-1, features)
    if torch.compiler.is_compiling():  # dynamo traces the plain form and fuses it better
        return torch.einsum("nrk,rkc->nrc", flat.view(-1, features // b, b), blocks).reshape(x.shape)
    return _BlockRotate.apply(flat.contiguous(), blocks.contiguous()).reshape(x.shape)


def block_rotate_reference(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Plain reference of :func:`block_rotate`: ``x @ blockdiag(blocks)`` with the dense matrix."""
    features, b = x.shape[-1], blocks.shape[-1]
    full = torch.block_diag(*blocks.expand(features // b, b, b))
    return x @ full
