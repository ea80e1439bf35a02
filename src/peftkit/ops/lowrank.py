"""The LoRA low-rank update of a linear output, as a plain reference and as an in-place fast path.

Conventions: ``x: (..., in)``, ``A: (r, in)``, ``B: (out, r)``, optional ``bias_B: (out,)``,
``result: (..., out)``; the update is ``scaling * ((x @ A.T) @ B.T + bias_B)``.
"""

from __future__ import annotations

import torch


def lowrank_update_reference(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float | torch.Tensor,
    bias_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain out-of-place ``result + scaling * (x @ A.T @ B.T + bias_B)``, cast back to ``result.dtype``."""
    delta = torch.nn.functional.linear(torch.nn.functional.linear(x.to(A.dtype), A), B, bias_B)
    return (result + delta * scaling).to(result.dtype)


def can_update_inplace(result: torch.Tensor, A: torch.Tensor | torch.dtype) -> bool:
    """Whether :func:`add_lowrank_` may write into ``result``.

    ``A`` is the adapter weight (or just the dtype the update is computed in). Requires the same dtype (a
    mixed-precision adapter adds in its own precision, out of place, like the
    reference), a contiguous result, and not a leaf that requires grad. The caller guarantees that no autograd
    node saved ``result`` (true for the outputs of linear, conv and embedding layers).
    """
    dtype = A if isinstance(A, torch.dtype) else A.dtype
    if result.dtype != dtype or not result.is_contiguous():
        return False
    if result.requires_grad and result.is_leaf:
        return False
    base = result._base
    return base is None or not (base.requires_grad and base.is_leaf)


def add_lowrank_(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float | torch.Tensor,
    bias_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """``result += scaling * (x @ A.T @ B.T + bias_B)`` written into ``result`` with one ``addmm_`` (2-D results)
    or ``baddbmm_`` (3-D), into ``result`` itself rather than a view of it: autograd's record of an in-place op on a
    view (``CopySlices``) clones the whole output gradient in backward (~7% of an adapted ``768 -> 2048`` layer's
    step). Other ranks: ``addmm_`` into the 2-D view.

    Saves one output-sized temporary per call against the reference (the scaled product), which on CPU also
    means less allocator churn. Falls back to :func:`lowrank_update_reference` when
    :func:`can_update_inplace` says no. Returns the updated tensor (``result`` itself on the fast path).
    """
    if not can_update_inplace(result, A):
        return lowrank_update_reference(result, x, A, B, scaling, bias_B)
    x = x.to(A.dtype)
    if isinstance(scaling, torch.Tensor):  # a 0-dim tensor (compiled hot-swap): multiply, don't bake a constant
        hidden = (x.reshape(-1, x.shape[-1]) @ A.t()) * scaling
        bias_B = None if bias_B is None else bias_B * scaling
        scaling = 1.0
        result.view(-1, result.shape[-1]).addmm_(hidden, B.t(), alpha=scaling)
    elif result.dim() == 2 and x.dim() == 2:
        result.addmm_(x @ A.t(), B.t(), alpha=scaling)
    elif result.dim() == 3 and x.dim() == 3:
        result.baddbmm_(x @ A.t(), B.t().expand(result.shape[0], *B.t().shape), alpha=scaling)
    else:
        result.view(-1, result.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ A.t(), B.t(), alpha=scaling)
    if bias_B is not None:
        result.add_(bias_B, alpha=scaling)
    return result


def add_scaled_(result: torch.Tensor, delta: torch.Tensor, scaling: float | torch.Tensor) -> torch.Tensor:
    """``result += scaling * delta`` in place; a tensor ``scaling`` (compiled hot-swap) is multiplied in."""
    if isinstance(scaling, torch.Tensor):
        return result.add_(delta * scaling)
    return result.add_(delta, alpha=scaling)


def scaled_transpose(B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B.T`` as a new contiguous ``(r, out)`` tensor (``B: (out, r)``), the operand of
    :func:`add_lowrank_pretransposed_`."""
    return torch.mul(B.t(), scaling).contiguous()


def add_lowrank_pretransposed_(out2d: torch.Tensor, x2d: torch.Tensor, A: torch.Tensor, Bt_scaled: torch.Tensor
                               ) -> torch.Tensor:
    """``out2d += (x2d @ A.T) @ Bt_scaled`` in place: ``out2d: (N, out)``, ``x2d: (N, in)``, ``A: (r, in)``,
    ``Bt_scaled = scaled_transpose(B, scaling): (r, out)`` contiguous. Equals :func:`lowrank_update_reference` of
    ``(B, scaling)`` up to rounding (the scale is applied to ``B`` before the product instead of after it). No
    autograd: for no-grad inference, where a row-major second operand makes the small product several times
    cheaper at decode shapes (N of a few rows) than ``B.t()``."""
    return out2d.addmm_(torch.nn.functional.linear(x2d, A), Bt_scaled)
