"""Quantization backends: detect a quantized linear layer, read its dense weight, write a dense weight back.

A backend answers for one kind of quantized ``nn.Linear`` (bitsandbytes 8-bit / 4-bit, torchao int8). Adapter
layers never branch on the backend: they ask :func:`dense_weight` for the ``(out, in)`` float weight and give a new
dense weight to :func:`write_dense_weight`, which re-quantizes (or raises :class:`~peftkit.errors.MergeError`
naming the backend when it cannot). The libraries are imported lazily: a module cannot be a bitsandbytes or a
torchao layer unless that library is already loaded, so detection only looks at ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Protocol

import torch
from torch import nn

from ..errors import MergeError


class QuantBackend(Protocol):
    """What peftkit needs from a quantization backend."""

    #: user-readable name, as ``get_layer_status`` reports it (the reference's names: ``"bnb 8bit"``, ``"bnb 4bit"``)
    name: str

    def matches(self, module: nn.Module) -> bool:
        """True when ``module`` is a linear layer quantized by this backend."""
        ...

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The weight as a plain float32 tensor ``(out, in)`` (a new tensor; the caller may modify it)."""
        ...

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Quantize ``weight: (out, in)`` into ``module`` in the module's own format; MergeError if impossible."""
        ...

    def cannot_requantize(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot be re-quantized (a message naming the backend), or None when it can."""
        ...

    def prepare(self, module: nn.Module) -> None:
        """Make ``module`` safe to train through (e.g. undo and turn off CPU inference repacking)."""
        ...


_BACKENDS: list[QuantBackend] = []
_builtins = False


def register_backend(backend: QuantBackend) -> None:
    """Add ``backend`` to the detection table (tried in registration order)."""
    _BACKENDS.append(backend)


def _loaded(package: str) -> bool:
    return package in sys.modules


def backend_of(module: nn.Module) -> QuantBackend | None:
    """The backend that quantized ``module``, or None for a plain (or non-linear) layer.

    Cheap and import-free: returns None at once unless bitsandbytes or torchao is already imported (or a backend
    was registered).
    """
    if not isinstance(module, nn.Linear):
        return None
    if not _BACKENDS and not (_loaded("bitsandbytes") or _loaded("torchao")):
        return None
    _ensure_registered()
    return next((b for b in _BACKENDS if b.matches(module)), None)


def is_quantized(module: nn.Module) -> bool:
    """True for a linear layer whose weight is stored quantized by a known backend."""
    return backend_of(module) is not None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of ``module`` as a float tensor: ``module.weight`` itself for plain layers (same layout, may be
    a view of the parameter), the dequantized ``(out, in)`` float32 weight for quantized linears."""
    backend = backend_of(module)
    return module.weight if backend is None else backend.dequantize(module)


def check_requantizable(module: nn.Module) -> None:
    """Raise :class:`~peftkit.errors.MergeError` (naming the backend) if a dense weight written to ``module``
    could not be re-quantized; plain layers always pass."""
    backend = backend_of(module)
    reason = None if backend is None else backend.cannot_requantize(module)
    if reason is not None:
        raise MergeError(reason)


def write_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` (the layout of :func:`dense_weight`) in ``module``; quantized layers are re-quantized."""
    backend = backend_of(module)
    if backend is None:
        with torch.no_grad():
            module.weight.data.copy_(weight.to(module.weight.dtype))
        return
    backend.requantize(module, weight.detach())


def _ensure_registered() -> None:
    """Register the built-in backends on first use (their modules import nothing heavy at import time)."""
    global _builtins
    if _builtins:
        return
    _builtins = True
    from .bnb import Bnb4bitBackend, Bnb8bitBackend
    from .torchao import TorchaoBackend

    _BACKENDS[:0] = [Bnb8bitBackend(), Bnb4bitBackend(), TorchaoBackend()]
