"""RoAd's tensor math: pure functions of tensors (no modules, no state).

Notation, for a layer with ``out`` output features and ``group_size = 2h``: the features form ``G = out / 2h``
groups; in group ``g`` feature ``j < h`` (the "a" half) pairs with feature ``j + h`` (the "b" half). The 2x2 matrix
acting on a pair ``(y_a, y_b)`` is ``[[c_a, -s_a], [s_b, c_b]]``::

    y'_a = y_a * c_a - y_b * s_a
    y'_b = y_b * c_b + y_a * s_b

``cos`` / ``sin`` (``c`` / ``s``) are ``(G, 2, h)`` tensors (dim 1: the a/b half), ``α cos θ`` / ``α sin θ``. This is
the reference's ``y * first_col + rotate_half(y) * second_col``, written on views of ``y`` so that autograd keeps
only ``y`` for the backward pass (the reference also keeps ``rotate_half(y)``, a second output-sized tensor).
"""

from __future__ import annotations

from typing import Any

import torch


def road_coefficients(
    variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(G, 2, h)``, from the stored vectors (the reference's layout of each variant).

    ``road_1``: ``theta, alpha: (out / 2,)``, one angle/scale per pair (``(G, h)``, shared by both halves);
    ``road_2``: ``(out,)``, one per feature; ``road_4``: ``(2 * out,)``, per group ``[cos part (2h), sin part (2h)]``
    for both the angles and the scales.
    """
    h = group_size // 2
    if variant == "road_1":
        theta_g, alpha_g = theta.reshape(-1, 1, h), alpha.reshape(-1, 1, h)
        cos, sin = alpha_g * theta_g.cos(), alpha_g * theta_g.sin()
        return cos.expand(-1, 2, h), sin.expand(-1, 2, h)
    if variant == "road_2":
        theta_g, alpha_g = theta.reshape(-1, 2, h), alpha.reshape(-1, 2, h)
        return alpha_g * theta_g.cos(), alpha_g * theta_g.sin()
    if variant == "road_4":
        theta_g, alpha_g = theta.reshape(-1, 2, 2, h), alpha.reshape(-1, 2, 2, h)  # (G, cos|sin, a|b, h)
        return alpha_g[:, 0] * theta_g[:, 0].cos(), alpha_g[:, 1] * theta_g[:, 1].sin()
    raise ValueError(f"unknown RoAd variant {variant!r}; allowed: road_1, road_2, road_4")


def apply_road(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate and scale the feature pairs of ``y: (..., out)`` (the last dimension); ``cos`` / ``sin``: ``(G, 2, h)``
    with ``G * 2h = out``. Returns ``(..., out)``.

    The fast path (:class:`RoadRotation`: two fused passes forward, ``y`` kept for backward) when autograd is
    recording outside ``torch.compile``; otherwise the same math in fused out-of-place ops (no autograd needed) or,
    while compiling, :func:`apply_road_reference` (dynamo traces and fuses it).
    """
    if torch.compiler.is_compiling():
        return apply_road_reference(y, cos, sin)
    if torch.is_grad_enabled() and (y.requires_grad or cos.requires_grad or sin.requires_grad):
        return RoadRotation.apply(y, cos, sin)
    return _rotate(y, cos, sin)


def _rotate(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``R y`` (``transpose``: ``Rᵀ y``) into a new tensor with two fused passes, without temporaries."""
    shape = cos.shape[-3:]
    ya, yb = y.unflatten(-1, shape).unbind(-2)
    out = torch.empty(y.shape, dtype=torch.result_type(y, cos), device=y.device)
    oa, ob = out.unflatten(-1, shape).unbind(-2)
    ca, cb = cos.unbind(-2)
    sa, sb = sin.unbind(-2)
    if transpose:  # [[c_a, s_b], [-s_a, c_b]]
        torch.addcmul(torch.mul(ya, ca, out=oa), yb, sb, out=oa)
        torch.addcmul(torch.mul(yb, cb, out=ob), ya, sa, value=-1, out=ob)
    else:  # [[c_a, -s_a], [s_b, c_b]]
        torch.addcmul(torch.mul(ya, ca, out=oa), yb, sa, value=-1, out=oa)
        torch.addcmul(torch.mul(yb, cb, out=ob), ya, sb, out=ob)
    return out


class RoadRotation(torch.autograd.Function):
    """``R y`` with a hand-written backward: keeps ``y`` (and the small coefficients) only; the gradients of ``y``
    (``Rᵀ g``) and of ``cos`` / ``sin`` (row sums of ``g ⊙ y`` and ``∓ g ⊙ swap(y)``) in a few fused passes.
    Checked against :func:`apply_road_reference` (values and gradients) in tests/test_road.py."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, cos, sin)
        return _rotate(y, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, cos, sin = ctx.saved_tensors
        grad = grad.contiguous()
        grad_y = _rotate(grad, cos, sin, transpose=True) if ctx.needs_input_grad[0] else None
        grad_cos = grad_sin = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            shape = cos.shape[-3:]
            g, yg = grad.unflatten(-1, shape), y.unflatten(-1, shape)  # (..., G, 2, h)
            lead = g.dim() - 3
            if ctx.needs_input_grad[1]:
                grad_cos = (g * yg).sum(dim=tuple(range(lead))).to(cos.dtype)
            if ctx.needs_input_grad[2]:
                ga, gb = g.unbind(-2)
                ya, yb = yg.unbind(-2)
                dims = tuple(range(lead))
                grad_sin = torch.stack(((ga * yb).sum(dim=dims).neg_(), (gb * ya).sum(dim=dims)), dim=-2)
                grad_sin = grad_sin.to(sin.dtype)
        return grad_y, grad_cos, grad_sin


def apply_road_reference(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain autograd form of :func:`apply_road`; ``cos`` / ``sin`` may also carry leading dimensions that
    broadcast against ``y``'s (per-row coefficients ``(N, 1, ..., G, 2, h)``)."""
    ya, yb = y.unflatten(-1, cos.shape[-3:]).unbind(-2)  # (..., G, h) views of y
    out_a = ya * cos.select(-2, 0) - yb * sin.select(-2, 0)
    out_b = yb * cos.select(-2, 1) + ya * sin.select(-2, 1)
    return torch.stack((out_a, out_b), dim=-2).flatten(-3)


def apply_road_rows(weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``R @ weight`` for ``weight: (out, ...)`` (a weight ``(out, in)`` or a bias ``(out,)``): the rotation acts on
    dimension 0. Returns a contiguous tensor of ``weight``'s shape."""
    if weight.dim() == 1:
        return apply_road(weight, cos, sin)
    moved = weight.movedim(0, -1)  # (..., out)
    return apply_road(moved, cos, sin).movedim(-1, 0).contiguous()


def invert_coefficients(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(cos, sin)`` of ``R⁻¹`` (same layout): each 2x2 block ``[[c_a, -s_a], [s_b, c_b]]`` inverts to
    ``[[c_b, s_a], [-s_b, c_a]] / (c_a c_b + s_a s_b)``, exactly, without the dense ``out x out`` inverse.
    Computed in float64 and returned in ``cos``'s dtype."""
    c, s = cos.double(), sin.double()
    det = c[:, 0] * c[:, 1] + s[:, 0] * s[:, 1]  # (G, h)
    inv_cos = torch.stack((c[:, 1], c[:, 0]), dim=1) / det.unsqueeze(1)
    inv_sin = -s / det.unsqueeze(1)
    return inv_cos.to(cos.dtype), inv_sin.to(sin.dtype)
