"""Pure tensor math of MiSS: the shard sum of the inputs, the dense shared-block update, and the "bat" weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """``Σ_k x[..., k r:(k+1) r]`` over the ``r``-wide shards of the last dimension (the last one zero-padded):
    ``x: (..., in) -> (..., r)``, without copying ``x``."""
    n = x.shape[-1]
    if n % r == 0:  # no slice: its backward would zero-fill and copy an (..., in) gradient
        return x.unflatten(-1, (n // r, r)).sum(-2)
    aligned = n - n % r
    total = x[..., :aligned].unflatten(-1, (aligned // r, r)).sum(-2)
    return total + F.pad(x[..., aligned:], (0, r - (n - aligned)))


def bat_weight(weight: torch.Tensor, block: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """``W + ΔW`` (``sign=1``: ``W_ij (I + B_i) + B_i``) or its inverse (``sign=-1``: ``(W_ij - B_i)(I + B_i)⁻¹``)
    for ``W: (out, in)`` and ``B: (out/r, r, r)``; ``(out, in)`` in ``B``'s dtype. ``W`` is only viewed as
    ``(out/r, r · in/r, r)`` (row block, (row, column block), column) and multiplied once, never copied."""
    n_out, r = block.shape[0], block.shape[-1]
    w = weight.to(block.dtype).reshape(n_out, -1, r)  # (out/r, r · in/r, r): rows of W_i, split by column
    eye = torch.eye(r, device=block.device, dtype=block.dtype)
    lifted = block.unsqueeze(2)  # (out/r, r, 1, r): B_i added to every column block of row block i
    if sign > 0:
        out = torch.bmm(w, eye + block).unflatten(1, (r, -1)) + lifted
    else:
        lifted_eye = eye + block
        low = block.dtype in (torch.float16, torch.bfloat16)  # no half-precision inverse kernels on CPU
        inverse = torch.linalg.inv(lifted_eye.float() if low else lifted_eye).to(block.dtype)
        out = torch.bmm((w.unflatten(1, (r, -1)) - lifted).flatten(1, 2), inverse).unflatten(1, (r, -1))
    return out.reshape(weight.shape)


def shared_delta(block: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Dense ``ΔW: (out, in)`` of a ``"miss"`` / ``"mini"`` block already expanded to ``(r, out)``:
    ``ΔW[o, j] = B[j mod r, o]``."""
    r = block.shape[0]
    reps = -(-in_features // r)
    return block.T.repeat(1, reps)[:, :in_features].reshape(out_features, in_features)
