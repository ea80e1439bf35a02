"""LoRA initialisations, as a table from ``init_lora_weights`` to a function (no if/elif chains)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .config import canonical_init


def _kaiming_A_zero_B(A: nn.Module, B: nn.Module, r: int) -> None:
    nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # U(±1/sqrt(fan_in)), nn.Linear's own default
    nn.init.zeros_(B.weight)
    if B.bias is not None:
        nn.init.zeros_(B.bias)


def _gaussian_A_zero_B(A: nn.Module, B: nn.Module, r: int) -> None:
    nn.init.normal_(A.weight, std=1 / r)
    nn.init.zeros_(B.weight)
    if B.bias is not None:
        nn.init.zeros_(B.bias)


def _module_default(A: nn.Module, B: nn.Module, r: int) -> None:
    """``init_lora_weights=False``: torch's default init of both layers, so the adapter is not a no-op."""
    for module in (A, B):
        module.reset_parameters()


_LINEAR_INITS: dict[object, Callable[[nn.Module, nn.Module, int], None]] = {
    True: _kaiming_A_zero_B,
    "gaussian": _gaussian_A_zero_B,
    False: _module_default,
}


def init_conv_or_linear_(A: nn.Module, B: nn.Module, mode: bool | str, r: int) -> None:
    """Initialise the ``lora_A``/``lora_B`` modules of a linear or conv adapter in place."""
    _LINEAR_INITS[canonical_init(mode)](A, B, r)  # type: ignore[index]


def init_embedding_(A: torch.Tensor, B: torch.Tensor, mode: bool | str) -> None:
    """Embedding adapters: ``A = 0, B ~ N(0, 1)`` (identity at init); with ``False`` both ~ N(0, 1)."""
    with torch.no_grad():
        if mode is False:
            A.normal_()
        else:
            A.zero_()
        B.normal_()


# ---------------------------------------------------------------------------------------------- base-weight inits
# PiSSA and OLoRA derive A and B from the base weight W: (out, in) (float32) and return the residual
# W - scaling * B @ A that replaces W, so the layer output is unchanged at init.

def _pissa(weight: torch.Tensor, r: int, scaling: float, niter: int | None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: the top-``r`` SVD ``W ≈ U S V^T``; ``A = sqrt(S/s) V^T: (r, in)``, ``B = U sqrt(S/s): (out, r)``.
    ``niter`` given: randomized ``torch.svd_lowrank(W, r, niter)`` instead of the full SVD."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, r, niter=niter)
        Vh = V.t()
    root = torch.sqrt(S / scaling)
    A = torch.diag(root) @ Vh
    B = U @ torch.diag(root)
    return A, B, weight - scaling * B @ A


def _olora(weight: torch.Tensor, r: int, scaling: float, niter: int | None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: ``W = Q R`` (reduced QR); ``B = Q[:, :r]: (out, r)``, ``A = R[:r]: (r, in)``."""
    Q, R = torch.linalg.qr(weight)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, weight - scaling * B @ A


_WEIGHT_INITS: dict[str, Callable[[torch.Tensor, int, float, int | None],
                                  tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
    "pissa": _pissa,
    "pissa_niter": _pissa,
    "olora": _olora,
}


def _weight_init_key(mode: object) -> tuple[str, int | None] | None:
    """``"pissa"`` -> ``("pissa", None)``, ``"pissa_niter_4"`` -> ``("pissa_niter", 4)``, ``"olora"`` ->
    ``("olora", None)`` (also ``"OLoRA"``); None for inits that do not use the base weight."""
    mode = canonical_init(mode)
    if not isinstance(mode, str):
        return None
    head, sep, tail = mode.rpartition("_")
    if sep and head == "pissa_niter" and tail.isdigit():
        return head, int(tail)
    return (mode, None) if mode in _WEIGHT_INITS and mode != "pissa_niter" else None


def uses_base_weight(mode: object) -> bool:
    """Does ``init_lora_weights=mode`` derive the adapter from (and modify) the base weight?"""
    return _weight_init_key(mode) is not None


def init_from_weight(weight: torch.Tensor, mode: str, r: int, scaling: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A: (r, in), B: (out, r), residual: (out, in))`` for PiSSA / OLoRA from ``weight: (out, in)`` (float32)."""
    key = _weight_init_key(mode)
    assert key is not None
    return _WEIGHT_INITS[key[0]](weight, r, scaling, key[1])


#: the ``init_lora_weights`` values peftkit implements today (plus ``pissa_niter_<k>``)
SUPPORTED_INITS = (*_LINEAR_INITS, "pissa", "olora")


def is_supported_init(mode: object) -> bool:
    """Is ``init_lora_weights=mode`` implemented by peftkit?"""
    mode = canonical_init(mode)
    return any(mode is m or (isinstance(mode, str) and mode == m) for m in _LINEAR_INITS) or uses_base_weight(mode)
