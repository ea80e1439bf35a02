"""DoRA (weight-decomposed LoRA) on ``nn.Linear`` / GPT-2 ``Conv1D``, ``nn.Embedding`` and ``nn.Conv1d/2d/3d``.

Every layer kind is handled through one "norm view" of its base weight, ``V: (n, ...)``, whose first axis is the
axis the magnitude scales, and the scaled low-rank update ``ΔV`` in the same layout:

====================  ==========================  ==============================  ==========================
kind                  view ``V``                  norm over                       magnitude shape (saved)
====================  ==========================  ==============================  ==========================
Linear                ``W: (out, in)``            ``in`` (each output row)        ``(out,)``
Conv1D (GPT-2)        ``W.T: (out, in)``          ``in``                          ``(out,)``
Embedding             ``W.T: (dim, num_emb)``     the vocabulary (each column)    ``(dim,)``
Conv1d/2d/3d          ``W: (out, in, *k)``        ``in`` and the kernel           ``(1, out, 1, ...)``
====================  ==========================  ==============================  ==========================

DoRA keeps a trainable magnitude ``m`` initialised to ``n = ‖V + ΔV‖`` and computes

    y = base(x) + (m / n - 1) * base_no_bias(x) + (m / n) * scaling * B(A(dropout(x))),   n detached

so that the effective weight is ``m * (V + ΔV) / n`` along the first view axis (DoRA paper §4.3 detaches ``n``).
The magnitude is saved under ``lora_magnitude_vector`` (no ``.weight``), with the reference's shapes above.
"""

from __future__ import annotations

import torch
from torch import nn


class DoraMagnitude(nn.Module):
    """Holds the magnitude ``weight`` of one DoRA adapter (``(n,)``, or ``(1, out, 1, ...)`` for convolutions)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


def view_norm(view: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``‖V + ΔV‖`` over every axis but the first: ``(n, ...), (n, ...) -> (n,)``, detached, in ``V``'s dtype."""
    with torch.no_grad():
        total = view + delta.to(view.dtype)
        return torch.linalg.vector_norm(total, dim=tuple(range(1, total.dim()))).to(view.dtype)


def dora_update(
    result: torch.Tensor,
    base_no_bias: torch.Tensor,
    lora_out: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
) -> torch.Tensor:
    """``result + (m/n - 1) * base_no_bias + (m/n) * lora_out`` (``lora_out`` already scaled).

    ``m`` and ``n`` have the magnitude's shape, which broadcasts against the outputs: ``(out,)`` against
    ``(..., out)``, ``(1, out, 1, ...)`` against ``(N, out, *spatial)``.
    """
    factor = (magnitude / norm).to(lora_out.dtype)
    return (result + (factor - 1) * base_no_bias.to(lora_out.dtype) + factor * lora_out).to(result.dtype)
