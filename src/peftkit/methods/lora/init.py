"""LoRA initialisations, as a table from ``init_lora_weights`` to a function (no if/elif chains)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


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
    _LINEAR_INITS[mode](A, B, r)


def init_embedding_(A: torch.Tensor, B: torch.Tensor, mode: bool | str) -> None:
    """Embedding adapters: ``A = 0, B ~ N(0, 1)`` (identity at init); with ``False`` both ~ N(0, 1)."""
    with torch.no_grad():
        if mode is False:
            A.normal_()
        else:
            A.zero_()
        B.normal_()


#: the ``init_lora_weights`` values peftkit implements today
SUPPORTED_INITS = tuple(_LINEAR_INITS)
