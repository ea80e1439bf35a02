"""GLoRA's training forward without keeping the adapted weight for backward.

``F.linear(x, W', b')`` with ``W' = W + Σ (W ⊙ A_i + B_i)`` built by autograd keeps ``W': (out, in)`` per adapted
layer until backward: as much memory as the adapted base weights themselves (the reference keeps it too).
:func:`glora_linear` keeps only ``x`` and the small support tensors and rebuilds ``W'`` in backward (an element-wise
pass plus the rank-``r`` products, cheap next to the token matmuls). :func:`glora_linear_reference` is the plain
autograd version it is tested against (tests/test_glora.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: one support tensor as its factors: ``(Xd, Xu)`` (low rank) or ``(X,)`` (broadcastable to its target)
Support = tuple[torch.Tensor, ...]


def build_weight(weight: torch.Tensor, supports: Sequence[tuple[Support, Support]]) -> torch.Tensor:
    """``W + Σ_i (W ⊙ A_i + B_i): (out, in)`` for ``weight: (out, in)`` and ``(A_i, B_i)`` factor tuples, each cast
    to ``weight``'s dtype; a low-rank ``B`` is added by ``addmm``, ``W ⊙ A`` by ``addcmul`` (no extra temporaries)."""
    acc = weight
    for parts_A, parts_B in supports:
        parts_B = tuple(t.to(weight.dtype) for t in parts_B)
        acc = torch.addmm(acc, *parts_B) if len(parts_B) == 2 else acc + parts_B[0]
        parts_A = tuple(t.to(weight.dtype) for t in parts_A)
        acc = torch.addcmul(acc, weight, parts_A[0] @ parts_A[1] if len(parts_A) == 2 else parts_A[0])
    return acc


def _flatten(supports: Sequence[tuple[Support, Support]]) -> tuple[list[int], list[torch.Tensor]]:
    """The factor counts ``[len(A_0), len(B_0), ...]`` and the factors in order."""
    counts = [len(parts) for pair in supports for parts in pair]
    return counts, [t for pair in supports for parts in pair for t in parts]


def _unflatten(counts: Sequence[int], tensors: Sequence[torch.Tensor]) -> list[tuple[Support, Support]]:
    groups, at = [], 0
    for n in counts:
        groups.append(tuple(tensors[at:at + n]))
        at += n
    return [(groups[i], groups[i + 1]) for i in range(0, len(groups), 2)]


class _GloraLinear(torch.autograd.Function):
    """``y = x W'ᵀ + b'`` saving ``x``, ``W`` and the factors only; backward rebuilds ``W'``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                counts: list[int], *factors: torch.Tensor) -> torch.Tensor:
        ctx.counts = counts
        ctx.save_for_backward(x, weight, *factors)
        ctx.has_bias = bias is not None
        return F.linear(x, build_weight(weight, _unflatten(counts, factors)), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, *factors = ctx.saved_tensors
        leaves = [f.detach().requires_grad_(f.requires_grad) for f in factors]
        with torch.enable_grad():
            w_eff = build_weight(weight.detach(), _unflatten(ctx.counts, leaves))
        grad_x = grad @ w_eff.detach() if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads_f: list[torch.Tensor | None] = [None] * len(leaves)
        if wanted and w_eff.requires_grad:
            g_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # dL/dW': (out, in)
            found = iter(torch.autograd.grad(w_eff, wanted, g_w, allow_unused=True))
            grads_f = [next(found) if leaf.requires_grad else None for leaf in leaves]
        return (grad_x, None, grad_bias, None, *grads_f)


def glora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 supports: Sequence[tuple[Support, Support]]) -> torch.Tensor:
    """``x W'ᵀ + b': (..., out)`` for ``x: (..., in)``, frozen ``weight: (out, in)``, ``bias: (out,)`` or None (it
    may require grad: the adapted bias ``b'``), ``W'`` from :func:`build_weight`; backward rebuilds ``W'``."""
    counts, factors = _flatten(supports)
    return _GloraLinear.apply(x, weight, bias, counts, *factors)


def glora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           supports: Sequence[tuple[Support, Support]]) -> torch.Tensor:
    """The plain autograd version of :func:`glora_linear` (keeps ``W'`` for backward)."""
    return F.linear(x, build_weight(weight, supports), bias)
