"""Pure tensor math of BOFT (no modules, no state): block sizes, butterfly permutations, the Cayley transform,
multiplicative block dropout and the rotation of a weight matrix.

Notation (per adapted weight ``W: (out, n)``, ``n = in_features`` or ``in_channels * kh * kw``):

- ``boft_R: (m, D, H, H)``: ``m = boft_n_butterfly_factor`` factors of ``D`` blocks of size ``H`` (``D * H = n``);
  the skew-symmetric part of each block is Cayley-transformed to an orthogonal block ``Q = (I - S)(I + S)⁻¹``.
- factor ``i`` is the orthogonal matrix ``M_i = P_i · blockdiag(Q_i) · P_iᵀ`` with the fixed butterfly permutation
  matrix ``P_i[k, perm_i[k]] = 1``; the rotation is ``R = M_{m-1} ⋯ M_1 M_0`` (``n × n``).
- a linear layer computes ``y = ((x R) Wᵀ) ⊙ s + b`` with ``s = boft_s``; equivalently ``y = x W'ᵀ + b`` with
  ``W' = diag(s) · W · Rᵀ``, which :func:`rotate_columns` computes from index gathers and ``D`` small block
  products (``O(out · n · H)`` per factor) without ever building ``R`` or ``P`` densely (the reference builds both
  and multiplies ``n × n`` matrices, ``O(n³)`` per factor, on every forward).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ...errors import ConfigError


def resolve_blocks(n: int, block_size: int, block_num: int, n_butterfly_factor: int, what: str) -> tuple[int, int]:
    """``(block_size, block_num)`` of a layer with ``n`` rotated features, from the config's values (exactly one
    of them non-zero), with the reference's rules. ``what`` names ``n`` in messages (e.g. ``"in_features (32)"``).

    Raises :class:`ConfigError` naming the field when ``n`` does not split into the requested blocks or the butterfly
    factor does not fit (``2 ** (m - 1)`` must divide the number of blocks, and block size and number must be even
    when ``m > 1``).
    """
    extra = n_butterfly_factor - 1  # the paper's (and the reference's internal) count of butterfly levels
    if block_size == 0:
        if n % block_num:
            raise ConfigError("boft_block_num", block_num, f"allowed: a divisor of {what}")
        if extra and (extra > block_num.bit_length() - 1 or block_num % (2**extra)):
            raise ConfigError("boft_n_butterfly_factor", n_butterfly_factor,
                              f"allowed: 2 ** (boft_n_butterfly_factor - 1) must divide boft_block_num ({block_num})")
        block_size = n // block_num
    else:
        if n % block_size:
            raise ConfigError("boft_block_size", block_size, f"allowed: a divisor of {what}")
        if extra and n % (block_size * 2**extra):
            raise ConfigError("boft_n_butterfly_factor", n_butterfly_factor,
                              f"allowed: boft_block_size * 2 ** (boft_n_butterfly_factor - 1) must divide {what}")
        block_num = n // block_size
    if extra and block_num % 2:
        raise ConfigError("boft_block_num", block_num, "allowed: an even number of blocks when "
                          "boft_n_butterfly_factor > 1")
    if extra and block_size % 2:
        raise ConfigError("boft_block_size", block_size, "allowed: an even block size when boft_n_butterfly_factor > 1")
    return block_size, block_num


def butterfly_perm(n: int, chunk: int, half: int) -> torch.Tensor:
    """The butterfly permutation ``perm: (n,)`` of one factor: inside every chunk of ``chunk`` consecutive indices,
    the groups of ``half`` indices are reordered even groups first, then odd groups (chunk ``4·half``: groups
    ``0, 2, 1, 3``). ``chunk == 2·half`` gives the identity."""
    groups = chunk // half
    order = torch.cat([torch.arange(0, groups, 2), torch.arange(1, groups, 2)])
    within = (order.view(-1, 1) * half + torch.arange(half).view(1, -1)).flatten()  # (chunk,)
    return (torch.arange(0, n, chunk).view(-1, 1) + within.view(1, -1)).flatten()


#: one factor's ``(perm, inverse perm)`` index pair, or None for the identity
Perm = tuple[torch.Tensor, torch.Tensor] | None


def butterfly_perms(n: int, block_size: int, block_num: int, n_butterfly_factor: int) -> list[Perm]:
    """``(perm_i, argsort(perm_i))`` for each factor ``i`` (None where ``perm_i`` is the identity: always factor 0,
    so every factor when ``n_butterfly_factor == 1``). Factor ``i`` permutes within chunks of ``block_size · 2**i``
    features."""
    perms: list[Perm] = [None]
    for i in range(1, n_butterfly_factor):
        perm = butterfly_perm(n, n // (block_num // 2**i), block_size // 2)
        perms.append((perm, torch.argsort(perm)))
    return perms


def cayley(blocks: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``Q = (I - S)(I + S)⁻¹`` with ``S = (A - Aᵀ) / 2`` for a batch ``blocks: (B, H, H)`` of ``A``;
    ``A = 0`` gives ``Q = I``. Returns ``(B, H, H)`` in ``blocks``' dtype."""
    skew = 0.5 * (blocks - blocks.transpose(1, 2))
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype).expand_as(blocks)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).to(blocks.dtype)


def block_dropout(q: torch.Tensor, p: float) -> torch.Tensor:
    """BOFT's multiplicative dropout (training only): in one factor drawn at random, ``int(p · D)`` blocks drawn at
    random are replaced by the identity. ``q: (m, D, H, H)``. Draws ``torch.randint`` then ``torch.randperm`` from
    the default generator, as the reference; no host synchronisation (no ``.item()``), so ``torch.compile`` traces
    it without a graph break."""
    m, d, h, _ = q.shape
    factor = torch.randint(0, m, (1,))
    blocks = torch.randperm(d) < int(p * d)  # the reference shuffles a [1]*k + [0]*(d-k) mask with randperm(d)
    mask = (torch.arange(m).view(m, 1) == factor) & blocks.view(1, d)  # (m, D)
    eye = torch.eye(h, device=q.device, dtype=q.dtype)
    return torch.where(mask.to(q.device).view(m, d, 1, 1), eye, q)


def rotate_columns(w: torch.Tensor, q: torch.Tensor, perms: list[Perm]) -> torch.Tensor:
    """``w · Rᵀ`` for ``w: (rows, n)`` and the rotation ``R`` of the orthogonal blocks ``q: (m, D, H, H)`` composed
    with the butterfly permutations ``perms`` (see the module docstring); returns ``(rows, n)``.

    ``Rᵀ = M_0ᵀ M_1ᵀ ⋯ M_{m-1}ᵀ`` and ``Z M_iᵀ = ((Z P_i) blockdiag(Q_i)ᵀ) P_iᵀ``: a column gather with the inverse
    permutation, ``D`` block products ``Z[:, d] Q_{i,d}ᵀ`` and a column gather with ``perm_i``.
    """
    rows, n = w.shape
    _, d, h, _ = q.shape
    z = w
    for i, perm in enumerate(perms):
        if perm is not None:
            z = z.index_select(1, perm[1])
        # (D, rows, H) @ (D, H, H) -> (D, rows, H): block d of every row times Q_{i,d}ᵀ
        z = torch.matmul(z.view(rows, d, h).transpose(0, 1), q[i].transpose(1, 2)).transpose(0, 1).reshape(rows, n)
        if perm is not None:
            z = z.index_select(1, perm[0])
    return z


def rotated_weight(weight: torch.Tensor, scale: torch.Tensor, qs: list[torch.Tensor],
                   perms: list[list[Perm]]) -> torch.Tensor:
    """``diag(scale) · W · R_1ᵀ ⋯ R_kᵀ`` for ``weight: (out, n)``, ``scale: (out, 1)`` and the orthogonal blocks
    ``qs[j]: (m_j, D_j, H_j, H_j)`` with their permutations ``perms[j]`` (plain autograd; returns ``(out, n)``)."""
    w = weight * scale  # the scale acts on rows, the rotations on columns: they commute
    for q, perm in zip(qs, perms):
        w = rotate_columns(w, q, perm)
    return w


class _RotatedLinear(torch.autograd.Function):
    """``y = x W'ᵀ + b`` with ``W' = rotated_weight(W, scale, qs, perms)``, saving only ``x`` and the small adapter
    tensors for backward: ``W'`` (one ``out × n`` matrix per adapted layer, plus the rotation's intermediates) is
    rebuilt in backward, which costs ``O(out · n · H)`` against the ``O(T · out · n)`` of the matmuls. The frozen
    base weight ``W`` gets no gradient (callers use :func:`rotated_weight` when it requires one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, perms: list[list[Perm]],
                scale: torch.Tensor, *qs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            w = rotated_weight(weight, scale, list(qs), perms)
        ctx.perms = perms
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias, scale, *qs)
        return F.linear(x, w, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, scale, *qs = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(need) for t, need in zip([scale, *qs], ctx.needs_input_grad[4:])]
        with torch.enable_grad():
            w = rotated_weight(weight, leaves[0], leaves[1:], ctx.perms)
        grad_x = grad.matmul(w.detach()) if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)
        wanted = [t for t in leaves if t.requires_grad]
        grads_params: list[torch.Tensor | None] = [None] * len(leaves)
        if wanted:
            grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]).to(grad.dtype))
            found = iter(torch.autograd.grad(w, wanted, grad_w.to(w.dtype)))
            grads_params = [next(found) if t.requires_grad else None for t in leaves]
        return (grad_x, None, grad_bias, None, *grads_params)


def rotated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                   qs: list[torch.Tensor], perms: list[list[Perm]]) -> torch.Tensor:
    """``F.linear(x, rotated_weight(weight, scale, qs, perms), bias)`` for ``x: (..., n)`` -> ``(..., out)``,
    keeping ``W'`` out of the autograd graph (:class:`_RotatedLinear`) when the base weight is frozen and
    gradients are recorded; under ``torch.compile`` (which fuses the plain path itself) and otherwise the plain
    path. ``weight: (out, n)`` in the adapters' dtype, like ``x``."""
    if torch.compiler.is_compiling() or weight.requires_grad or not torch.is_grad_enabled():
        return F.linear(x, rotated_weight(weight, scale, qs, perms), bias)
    return _RotatedLinear.apply(x, weight, bias, perms, scale, *qs)
