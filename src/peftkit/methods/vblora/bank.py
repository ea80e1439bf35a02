"""VB-LoRA's factors from the shared vector bank (pure tensor functions).

Conventions: ``bank: (num_vectors, L)``; ``logits_A: (r, in / L, num_vectors)``; ``logits_B: (out / L, r,
num_vectors)``; ``A: (r, in)``, ``B: (out, r)``; ``ΔW = B @ A``.
"""

from __future__ import annotations

import torch

#: the logit of a bank vector outside a restored top-k (never selected; ``-inf`` in the reference)
MASKED_LOGIT = torch.finfo(torch.float32).min


def mix_topk(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """``(..., num_vectors) -> (..., L)``: the softmax-weighted sum of the ``topk`` bank vectors with the largest
    logits (softmax over those ``topk`` logits only). Differentiable in ``logits`` and ``bank``."""
    top, indices = logits.topk(topk, dim=-1)  # (..., k)
    weights = torch.softmax(top, dim=-1)
    # broadcast multiply and sum: for k = 2..8 half the time of einsum's bmm (forward and backward)
    return (weights.unsqueeze(-1) * bank[indices]).sum(-2)


def vblora_factors(logits_A: torch.Tensor, logits_B: torch.Tensor, bank: torch.Tensor, topk: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A: (r, in), B: (out, r))`` assembled from ``bank`` (see the module docstring for the shapes)."""
    r = logits_A.shape[0]
    A = mix_topk(logits_A, bank, topk).reshape(r, -1)  # (r, in/L, L) -> (r, in)
    B = mix_topk(logits_B, bank, topk).transpose(1, 2).reshape(-1, r)  # (out/L, r, L) -> (out/L, L, r) -> (out, r)
    return A, B


def topk_only(logits: torch.Tensor, topk: int, index_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's compact form of ``logits: (..., num_vectors)``: ``(indices: (..., k) of index_dtype,
    weights: (..., k - 1))``, the top-k indices and their softmax weights without the last (it is 1 - the sum)."""
    top, indices = logits.topk(topk, dim=-1)
    return indices.to(index_dtype), torch.softmax(top, dim=-1)[..., :-1].contiguous()


def logits_from_topk(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """Inverse of :func:`topk_only`: logits ``(..., num_vectors)`` (float32) equal to ``log(weight)`` at the saved
    indices and the lowest finite float32 (:data:`MASKED_LOGIT`) elsewhere, so :func:`mix_topk` gives back the saved
    mixture. The reference fills ``-inf``, which gives the same mixture but makes every such load warn that the
    checkpoint holds non-finite values."""
    full = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1).float()
    out = torch.full((*full.shape[:-1], num_vectors), MASKED_LOGIT, device=full.device)
    return out.scatter(-1, indices.long(), full.log())


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer dtype the reference stores top-k indices in for a bank of ``num_vectors``."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    return torch.int32 if num_vectors < 2**31 else torch.int64
