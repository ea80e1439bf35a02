"""The LoRA update of a linear output with dropout fused into the A-projection, as a plain reference and as a
lean fast path.

Conventions: ``x: (..., in)``, ``A: (r, in)``, ``B: (out, r)``, optional ``bias_B: (out,)``, ``result: (..., out)``,
dropout probability ``p`` (0: none) with keep-mask ``mask: (..., in)`` bool; the update is
``scaling * (dropout(x) @ A.T @ B.T + bias_B)`` with ``dropout(x) = x * mask / (1 - p)``.

Why a fast path: ``nn.Dropout`` followed by ``lora_A`` keeps, per adapted module, a full-size float noise tensor
(CPU) and the dropped copy of ``x`` for backward. :class:`_DropoutProject` keeps only ``x`` (which the base layer
saves anyway: the same tensor, no copy) and a 1-byte mask, and recomputes ``x * mask`` in backward. The update is
then accumulated into the base output with one ``addmm_`` (no output-sized temporaries), in the compute dtype of
the reference (the adapter's dtype, or the autocast dtype under autocast).

Under ``torch.compile`` (:func:`compiling`) every entry point here steps aside for the plain reference
(:func:`lora_update_reference`): the autograd functions, the scratch buffers and the 16-bit mask draw are eager
optimisations that dynamo cannot trace into one graph, while it fuses the plain ops itself.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from .lowrank import can_update_inplace

#: ``torch.compiler.is_compiling``: True while dynamo traces (a constant in the traced code), else a flag read
compiling = torch.compiler.is_compiling

#: the keep-mask is drawn as 16-bit uniform integers (four per 64-bit draw): ``p`` is rounded to this grid
MASK_LEVELS = 1 << 16


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """``(mask, keep)``: a bool keep-mask of ``shape`` drawn from the default generator, ``True`` with probability
    ``keep``, which is ``1 - p`` rounded to a multiple of ``1 / 65536`` (scale the kept values by ``1 / keep`` to
    stay unbiased). Four 16-bit draws come from each 64-bit random number, drawn over the full 64-bit range
    (``random_(min, None)``: raw generator words, no per-word modulo as a bounded range needs): ~6x cheaper than
    ``torch.rand``."""
    numel = math.prod(shape)
    dropped = min(max(round(p * MASK_LEVELS), 0), MASK_LEVELS - 1)
    words = scratch((numel + 3) // 4, torch.int64, device, 2).random_(-(1 << 63), None)  # transient: reused
    levels = words.view(torch.int16)[:numel].view(shape)
    return levels >= dropped - (MASK_LEVELS >> 1), (MASK_LEVELS - dropped) / MASK_LEVELS


_scratch = threading.local()


def scratch(numel: int, dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """A flat per-thread work buffer of at least ``numel`` elements (reused: no page faults for transient
    full-size tensors). Valid until the next call with the same ``slot`` on this thread."""
    buffers: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    key = (dtype, device, slot)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def lora_update_reference(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float | torch.Tensor,
    bias_B: torch.Tensor | None = None,
    p: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain out-of-place ``result + scaling * (dropout(x) @ A.T @ B.T + bias_B)`` as the reference computes it
    (``nn.Dropout`` then two ``F.linear``), cast back to ``result.dtype``. With ``p > 0`` the keep-mask ``mask``
    (shape of ``x``) is used when given, else ``F.dropout`` draws one."""
    x = x.to(A.dtype)
    if p > 0:
        x = F.dropout(x, p, training=True) if mask is None else x * mask.to(x.dtype) / (1 - p)
    delta = F.linear(F.linear(x, A), B, bias_B)
    return (result + delta * scaling).to(result.dtype)


class _DropoutProject(torch.autograd.Function):
    """``(x * mask) @ A.T * scale`` for ``x: (N, in)``, ``mask: (N, in)`` bool, ``A: (r, in)`` -> ``(N, r)``.

    Saves ``x``, ``A`` and the bool mask (not the dropped copy); backward recomputes ``x * mask``. In float32 and
    float64 both directions run by row blocks of about :data:`BLOCK_ELEMENTS` elements (:func:`row_blocks`): the
    masked block is made in a small scratch buffer that stays in the CPU cache for the product that reads it, so
    no full-size masked copy is written and read back (~35% cheaper backward than full-size passes). The mask is
    applied through its ``uint8`` view (same bytes, 0/1). Half-precision inputs (autocast) take the full-size
    passes, so every product accumulates in one matmul as before.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, A: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
        hidden = _masked_project(x, mask, A)
        hidden.mul_(scale)
        ctx.save_for_backward(x, A, mask)
        ctx.scale = scale  # type: ignore[attr-defined]
        return hidden

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, A, mask = ctx.saved_tensors  # type: ignore[attr-defined]
        grad = grad * ctx.scale  # type: ignore[attr-defined]  # (N, r): small
        grad_x, grad_A = _masked_project_grads(x, A, mask, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_x, grad_A, None, None


#: elements per row block of the blocked dropout products (float32: 256 KB, well inside a core's L2 cache)
BLOCK_ELEMENTS = 1 << 16


def row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(rows)`` in blocks of about :data:`BLOCK_ELEMENTS` elements of
    a ``(rows, cols)`` tensor (at least one row per block)."""
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def _blocked(x: torch.Tensor) -> bool:
    """Whether the masked products run by row blocks: a float32/float64 CPU input (other devices and half
    precision keep full-size passes)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def _block_buffer(x: torch.Tensor) -> torch.Tensor:
    """A scratch ``(rows per block, in)`` buffer for the masked blocks of ``x: (N, in)``."""
    step = row_blocks(x.shape[0], x.shape[1])[0][1] if x.shape[0] else 1
    return scratch(step * x.shape[1], x.dtype, x.device).view(step, x.shape[1])


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` as 0/1 in ``dtype``, in a scratch buffer (a bool operand would make torch allocate this copy)."""
    return scratch(mask.numel(), dtype, mask.device, 1).view(mask.shape).copy_(mask)


def _as_01(mask: torch.Tensor) -> torch.Tensor:
    """The bool ``mask`` as a ``uint8`` 0/1 view of the same bytes (no copy). A bool operand would make ``mul``
    allocate a full-size bool-to-float copy through its own path; with ``uint8`` the multiply is ~1.5x cheaper
    (CPU, measured against copy-to-float then multiply)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` (``x: (N, in)``, bool ``mask: (N, in)``) in a scratch buffer (valid until the next call)."""
    return torch.mul(x, _as_01(mask), out=scratch(x.numel(), x.dtype, x.device).view(x.shape))


def lora_hidden(x2d: torch.Tensor, A: torch.Tensor, p: float = 0.0, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``dropout(x2d) @ A.T``: ``(N, in), (r, in) -> (N, r)``; ``p == 0`` is one matmul, ``p > 0`` goes through
    :class:`_DropoutProject` with ``mask`` (``(N, in)`` bool, kept values scaled by ``1 / (1 - p)``); without
    ``mask`` one is drawn by :func:`dropout_mask` (keep probability ``1 - p`` rounded to ``1 / 65536``)."""
    if p <= 0:
        return x2d @ A.t()
    if mask is None:
        mask, keep = dropout_mask(x2d.shape, p, x2d.device)
    else:
        keep = 1.0 - p
    return _DropoutProject.apply(x2d, A, mask, 1.0 / keep)


class _AddLowRankInPlace(torch.autograd.Function):
    """``result += scaling * hidden @ B.T`` in place on ``result: (..., out)`` itself (``hidden: (N, r)``,
    ``B: (out, r)``). Written as a function that marks ``result`` dirty because an in-place ``addmm_`` on a
    2-D *view* of ``result`` would make autograd clone the full-size gradient in backward (``CopySlices``)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, result: torch.Tensor, hidden: torch.Tensor,
                B: torch.Tensor, scaling: float) -> torch.Tensor:
        result.view(-1, result.shape[-1]).addmm_(hidden, B.t(), alpha=scaling)
        ctx.mark_dirty(result)
        ctx.save_for_backward(hidden, B)
        ctx.scaling = scaling  # type: ignore[attr-defined]
        return result

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, None]:
        hidden, B = ctx.saved_tensors  # type: ignore[attr-defined]
        scaling = ctx.scaling  # type: ignore[attr-defined]
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_hidden = grad_B = None
        if ctx.needs_input_grad[1]:
            grad_hidden = (grad2d @ B).mul_(scaling)
        if ctx.needs_input_grad[2]:
            grad_B = (grad2d.t() @ hidden).mul_(scaling)
        return grad, grad_hidden, grad_B, None


def addmm_into_(result: torch.Tensor, hidden: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result += scaling * hidden @ B.T`` in place (``result: (..., out)``, ``hidden: (N, r)``, ``B: (out, r)``);
    through :class:`_AddLowRankInPlace` when autograd records it. Returns ``result``."""
    if torch.is_grad_enabled() and (result.requires_grad or hidden.requires_grad or B.requires_grad):
        return _AddLowRankInPlace.apply(result, hidden, B, scaling)
    result.view(-1, result.shape[-1]).addmm_(hidden, B.t(), alpha=scaling)
    return result


def compute_dtype(x: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    """The dtype the reference's adapter matmuls run in: the autocast dtype under autocast, else ``A``'s."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and A.is_floating_point():
        return torch.get_autocast_dtype(device)
    return A.dtype


def add_lora_(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float | torch.Tensor,
    bias_B: torch.Tensor | None = None,
    p: float = 0.0,
    inplace: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``result + scaling * (dropout(x) @ A.T @ B.T + bias_B)``, equal to :func:`lora_update_reference`.

    With ``inplace`` (the caller says no autograd node saved ``result``) and a writable ``result`` in the compute
    dtype, the update goes into ``result`` with one ``addmm_`` and ``result`` itself is returned; otherwise the sum
    is built out of place (still without the dropped copy of ``x``). ``mask``: the keep-mask (shape of ``x``) for
    ``p > 0``; drawn when None. Under ``torch.compile``: :func:`lora_update_reference` (out of place).
    """
    if compiling():
        return lora_update_reference(result, x, A, B, scaling, bias_B, p, mask)
    dtype = compute_dtype(x, A)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.dtype != dtype:
        x2d = x2d.to(dtype)
    A_c = A if A.dtype == dtype else A.to(dtype)
    hidden = lora_hidden(x2d, A_c, p, None if mask is None else mask.reshape(x2d.shape))  # (N, r)
    if isinstance(scaling, torch.Tensor):  # a 0-dim tensor (compiled hot-swap): multiply, don't bake a constant
        hidden = hidden * scaling
        bias_B = None if bias_B is None else bias_B * scaling
        scaling = 1.0
    if inplace and can_update_inplace(result, dtype):
        addmm_into_(result, hidden, B if B.dtype == dtype else B.to(dtype), scaling)
        if bias_B is not None:
            result.add_(bias_B.to(dtype), alpha=scaling)
        return result
    delta = F.linear(hidden, B, bias_B).reshape(*result.shape[:-1], -1)
    return (result + delta * scaling).to(result.dtype)


class _LinearLoRA(torch.autograd.Function):
    """``x2d @ W.T + b + scaling * (dropout(x2d) @ A.T) @ B.T`` for a frozen ``W: (out, in)`` as one autograd node.

    ``x2d: (N, in)``, ``b: (out,)`` or None, ``A: (r, in)``, ``B: (out, r)``, ``mask: (N, in)`` bool or None
    (no dropout), kept values scaled by ``keep_scale``. Saves what the base layer and the adapter save anyway
    (``x2d``, ``W``, ``A``, ``B``, the ``(N, r)`` hidden, the 1-byte mask). Backward writes the input gradient of
    the base layer and of the adapter into one ``(N, in)`` tensor (``g @ W``, then the adapter's part added in
    place), so autograd neither allocates a second input-sized gradient per adapted layer nor adds the two.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x2d: torch.Tensor, W: torch.Tensor,
                b: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scaling: float,
                mask: torch.Tensor | None, keep_scale: float) -> torch.Tensor:
        out = F.linear(x2d, W, b)
        if mask is None:
            hidden = x2d @ A.t()
        else:
            hidden = _masked_project(x2d, mask, A).mul_(keep_scale)
        out.addmm_(hidden, B.t(), alpha=scaling)
        ctx.save_for_backward(x2d, W, A, B, hidden, mask)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]:
        x2d, W, A, B, hidden, mask = ctx.saved_tensors  # type: ignore[attr-defined]
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]  # type: ignore[attr-defined]
        scaling, keep_scale = ctx.scaling, ctx.keep_scale  # type: ignore[attr-defined]
        grad_b = grad.sum(0) if need_b else None
        grad_B = (grad.t() @ hidden).mul_(scaling) if need_B else None
        grad_x = grad_A = None
        if need_x or need_A:
            grad_h = (grad @ B).mul_(scaling)  # (N, r)
            if mask is None:
                grad_A = grad_h.t() @ x2d if need_A else None
                if need_x:
                    grad_x = (grad @ W).addmm_(grad_h, A)
            else:
                grad_h.mul_(keep_scale)
                grad_x, grad_A = _masked_project_grads(x2d, A, mask, grad_h, need_x, need_A,
                                                       into=grad @ W if need_x else None)
        return grad_x, None, grad_b, grad_A, grad_B, None, None, None


def _masked_project(x2d: torch.Tensor, mask: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``(x2d * mask) @ A.T``: ``(N, in), (N, in) bool, (r, in) -> (N, r)``, by row blocks (:func:`row_blocks`)
    through a small scratch buffer; full-size passes in half precision."""
    if not _blocked(x2d):
        return _masked(x2d, mask) @ A.t()
    hidden = x2d.new_empty(x2d.shape[0], A.shape[0])
    At, keep = A.t(), _as_01(mask)
    buf = _block_buffer(x2d)
    for s, e in row_blocks(x2d.shape[0], x2d.shape[1]):
        torch.mm(torch.mul(x2d[s:e], keep[s:e], out=buf[: e - s]), At, out=hidden[s:e])
    return hidden


def _masked_project_grads(x2d: torch.Tensor, A: torch.Tensor, mask: torch.Tensor, grad_h: torch.Tensor,
                          need_x: bool, need_A: bool, into: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``h = (x2d * mask) @ A.T`` for the upstream ``grad_h: (N, r)``: ``grad_x = (grad_h @ A) * mask``
    (added in place to ``into: (N, in)`` when given, e.g. a base layer's input gradient) and ``grad_A = grad_h.T @
    (x2d * mask)``. float32/float64 CPU inputs run by row blocks that stay in the CPU cache (:func:`row_blocks`);
    half precision takes full-size passes, each product accumulating in one matmul."""
    grad_h = grad_h.to(A.dtype)
    grad_x = grad_A = None
    if not _blocked(x2d):
        keep = _float_mask(mask, x2d.dtype)  # converted once for both products
        if need_A:
            grad_A = grad_h.t() @ torch.mul(x2d, keep, out=scratch(x2d.numel(), x2d.dtype, x2d.device).view(x2d.shape))
        if need_x:
            grad_x = (grad_h @ A).mul_(keep) if into is None else into.addcmul_(grad_h @ A, keep)
        return grad_x, grad_A
    keep = _as_01(mask)
    if need_A:
        grad_A = torch.zeros_like(A)
    if need_x:
        grad_x = grad_h @ A if into is None else into  # (N, in): masked (or the masked part added) block by block
    buf = _block_buffer(x2d)
    for s, e in row_blocks(x2d.shape[0], x2d.shape[1]):
        if grad_A is not None:
            grad_A.addmm_(grad_h[s:e].t(), torch.mul(x2d[s:e], keep[s:e], out=buf[: e - s]))
        if grad_x is None:
            continue
        if into is None:
            grad_x[s:e].mul_(keep[s:e])
        else:
            grad_x[s:e].addcmul_(torch.mm(grad_h[s:e], A, out=buf[: e - s]), keep[s:e])
    return grad_x, grad_A


def linear_lora(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    p: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, b) + scaling * dropout(x) @ A.T @ B.T`` (``x: (..., in)`` -> ``(..., out)``) through
    :class:`_LinearLoRA`: equals :func:`lora_update_reference` applied to ``F.linear(x, W, b)``. For training a
    frozen ``nn.Linear`` base (``W`` must not require grad) with all tensors in one dtype, outside autocast.
    ``mask``: the keep-mask (shape of ``x``) for ``p > 0``; drawn when None (keep probability ``1 - p`` rounded to
    ``1 / 65536``, kept values scaled by its exact inverse). Under ``torch.compile``: the plain
    :func:`lora_update_reference` of ``F.linear(x, W, b)``."""
    if compiling():
        return lora_update_reference(F.linear(x, W, b), x, A, B, scaling, None, p, mask)
    x2d = x.reshape(-1, x.shape[-1])
    keep_scale = 1.0
    if p > 0:
        if mask is None:
            mask, keep = dropout_mask(x2d.shape, p, x2d.device)
        else:
            mask, keep = mask.reshape(x2d.shape), 1.0 - p
        keep_scale = 1.0 / keep
    else:
        mask = None
    out = _LinearLoRA.apply(x2d, W, b, A, B, scaling, mask, keep_scale)
    return out.view(*x.shape[:-1], out.shape[-1])


def dora_add_(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float | torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """DoRA on a linear output without dropout: ``f * (result - bias + scaling * x @ A.T @ B.T) + bias`` with
    ``f = magnitude / norm`` (``(out,)``), which equals ``result + (f - 1) * (result - bias) + f * lora`` of
    :func:`peftkit.methods.lora.dora.dora_update`. The low-rank update and the bias removal go into ``result``
    (the base output, which no autograd node saved) in place, so the only new output-sized tensor is the
    returned one. Returns None (nothing written) when ``result`` is not writable in the compute dtype,
    ``scaling`` is a tensor, or under ``torch.compile`` (the caller's plain formula traces better)."""
    if compiling():
        return None
    dtype = compute_dtype(x, A)
    if not can_update_inplace(result, dtype) or isinstance(scaling, torch.Tensor):
        return None
    x2d = x.reshape(-1, x.shape[-1])
    hidden = lora_hidden(x2d if x2d.dtype == dtype else x2d.to(dtype), A if A.dtype == dtype else A.to(dtype))
    addmm_into_(result, hidden, B if B.dtype == dtype else B.to(dtype), scaling)
    factor = (magnitude / norm).to(dtype)
    if bias is None:
        return result * factor
    result.sub_(bias.to(dtype))
    return torch.addcmul(bias.to(dtype), result, factor)
