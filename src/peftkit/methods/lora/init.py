"""LoRA initialisations, as a table from ``init_lora_weights`` to a function (no if/elif chains)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...layers.dispatch import EMBEDDING
from .config import canonical_init
from .corda import corda_init
from .loftq import LoftQInit, loftq_factors
from .loraga import LoraGAInit, as_lora_ga_config, lora_ga_init


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


def orthogonal_factors(r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``orthogonal_init`` (float32, drawn on the CPU's default generator in its order): ``Q`` from
    the QR of ``X ~ N(0, 1): (r, r)``; ``A = (N(0, 1): (in, r/2) @ Q[0::2]).T / 10: (r, in)`` and
    ``B = N(0, 1): (r/2, out).T @ Q[1::2] / 10: (out, r)``. The rows ``Q[0::2]`` and ``Q[1::2]`` are orthogonal,
    so ``B @ A = 0`` (identity at init) while neither factor is zero."""
    if r % 2:
        raise ConfigError("r", r, "init_lora_weights='orthogonal' needs an even rank (it splits the rows of an "
                          "orthogonal (r, r) matrix in two halves); use an even r / rank_pattern value")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = torch.randn(in_features, r // 2).mm(Q[0::2]).T / 10.0
    B = torch.randn(r // 2, out_features).T.mm(Q[1::2]) / 10.0
    return A.contiguous(), B.contiguous()


def _orthogonal(A: nn.Module, B: nn.Module, r: int) -> None:
    A_init, B_init = orthogonal_factors(r, A.weight.shape[1], B.weight.shape[0])
    with torch.no_grad():
        A.weight.copy_(A_init)
        B.weight.copy_(B_init)
        if B.bias is not None:
            B.bias.zero_()


_LINEAR_INITS: dict[object, Callable[[nn.Module, nn.Module, int], None]] = {
    True: _kaiming_A_zero_B,
    "gaussian": _gaussian_A_zero_B,
    False: _module_default,
    "orthogonal": _orthogonal,
    "eva": _kaiming_A_zero_B,  # a placeholder (B = 0) until initialize_lora_eva_weights sets A (eva.py)
}


def init_conv_or_linear_(A: nn.Module, B: nn.Module, mode: bool | str, r: int) -> None:
    """Initialise the ``lora_A``/``lora_B`` modules of a linear or conv adapter in place."""
    init = _LINEAR_INITS.get(canonical_init(mode))  # type: ignore[call-overload]
    if init is None or (mode == "orthogonal" and A.weight.dim() != 2):
        raise ConfigError("init_lora_weights", mode, f"not implemented for a {type(A).__name__} adapter (the "
                          "reference supports it on nn.Linear / Conv1D only); exclude this layer or use another init")
    init(A, B, r)


def init_embedding_(A: torch.Tensor, B: torch.Tensor, mode: bool | str, weight: torch.Tensor | None = None) -> None:
    """Embedding adapters (``A: (r, num_embeddings)``, ``B: (dim, r)``): ``A = 0, B ~ N(0, 1)`` (identity at init);
    with ``False`` both ~ N(0, 1); MiCA (needs the base ``weight: (num_embeddings, dim)``): ``A = 0`` and ``B`` the
    minor left singular vectors of ``weight.T: (dim, num_embeddings)``, as the reference's ``Embedding.mica_init``."""
    with torch.no_grad():
        if canonical_init(mode) == "mica" and weight is not None:
            A_init, B_init, _ = _mica(weight.detach().float().t(), A.shape[0], 1.0, None)
            A.copy_(A_init)
            B.copy_(B_init)
            return
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


def _mica(weight: torch.Tensor, r: int, scaling: float, niter: object
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MiCA: ``B = U[:, -r:]: (out, r)``, the left singular vectors of the ``r`` smallest singular values of
    ``W = U S V^T``; ``A = 0: (r, in)``; the base weight is unchanged (``B @ A = 0``). ``B`` stays frozen in training
    (:func:`frozen_weights`)."""
    if r > min(weight.shape):
        raise ConfigError("r", r, f"init_lora_weights='mica' needs r <= min(in_features, out_features) = "
                          f"{min(weight.shape)} for a weight of shape {tuple(weight.shape)}; lower r (rank_pattern)")
    U = torch.linalg.svd(weight, full_matrices=False)[0]
    return weight.new_zeros(r, weight.shape[1]), U[:, -r:].contiguous(), weight


def _loftq(weight: torch.Tensor, r: int, scaling: float, options: object
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ (:mod:`.loftq`): the residual is the quantized-dequantized weight."""
    assert isinstance(options, LoftQInit)
    return loftq_factors(weight, r, options.bits, options.iters)


_WEIGHT_INITS: dict[str, Callable[[torch.Tensor, int, float, Any],
                                  tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
    "pissa": _pissa,
    "pissa_niter": _pissa,
    "olora": _olora,
    "mica": _mica,
    "loftq": _loftq,
}


def resolve_init(config: Any) -> object:
    """The ``init_lora_weights`` value the layers receive for ``config``: the config's own value, except
    ``"loftq"``, which becomes a :class:`~.loftq.LoftQInit` carrying ``loftq_config``'s bits and iterations."""
    init = config.init_lora_weights
    if init == "lora_ga":  # LoRA-GA: the LoraGAInit carrying lora_ga_config (.loraga)
        return LoraGAInit(as_lora_ga_config(config.lora_ga_config))
    if init != "loftq":
        return init
    loftq = config.loftq_config if isinstance(config.loftq_config, dict) else vars(config.loftq_config)
    return LoftQInit(bits=loftq.get("loftq_bits", 4), iters=loftq.get("loftq_iter", 1))


#: data-driven inits: ``(base layer, weight, r, scaling, options) -> (A, B, residual)`` from what
#: ``preprocess_corda`` / ``preprocess_loraga`` attached to the base layer (:mod:`.corda`, :mod:`.loraga`)
_DATA_INITS: dict[str, Callable[[nn.Module, torch.Tensor, int, float, Any],
                                tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {
    "corda": corda_init,
    "lora_ga": lora_ga_init,
}


#: ``init_lora_weights`` values that derive the adapter from the base weight but leave that weight unchanged
_KEEPS_BASE = ("mica",)


def changes_base_weight(mode: object) -> bool:
    """Does ``init_lora_weights=mode`` rewrite the base weight (PiSSA, OLoRA, LoftQ; not MiCA)?"""
    key = _weight_init_key(mode)
    return key is not None and key[0] not in _KEEPS_BASE


def frozen_weights(mode: object) -> tuple[str, ...]:
    """Adapter weights that stay frozen while the adapter trains (the reference's ``frozen_peft_weight_names``):
    MiCA trains ``lora_A`` / ``lora_embedding_A`` only."""
    return ("lora_B", "lora_embedding_B") if canonical_init(mode) == "mica" else ()


def extra_init_kinds(config: Any) -> tuple[str, ...]:
    """Layer kinds beside ``nn.Linear`` / ``Conv1D`` that the base-weight init of ``config`` supports: MiCA also
    initialises ``nn.Embedding`` adapters (as the reference)."""
    return (EMBEDDING,) if canonical_init(config.init_lora_weights) == "mica" else ()


def _weight_init_key(mode: object) -> tuple[str, Any] | None:
    """``"pissa"`` -> ``("pissa", None)``, ``"pissa_niter_4"`` -> ``("pissa_niter", 4)``, ``"olora"`` ->
    ``("olora", None)`` (also ``"OLoRA"``), ``"loftq"`` / a ``LoftQInit`` -> ``("loftq", LoftQInit)``; None for
    inits that do not use the base weight."""
    if isinstance(mode, LoftQInit):
        return "loftq", mode
    if mode == "loftq":
        return "loftq", LoftQInit(4, 1)
    if isinstance(mode, LoraGAInit):
        return "lora_ga", mode
    mode = canonical_init(mode)
    if not isinstance(mode, str):
        return None
    head, sep, tail = mode.rpartition("_")
    if sep and head == "pissa_niter" and tail.isdigit():
        return head, int(tail)
    known = mode in _WEIGHT_INITS or mode in _DATA_INITS
    return (mode, None) if known and mode != "pissa_niter" else None


def uses_base_weight(mode: object) -> bool:
    """Does ``init_lora_weights=mode`` derive the adapter from (and modify) the base weight?"""
    return _weight_init_key(mode) is not None


def init_from_weight(weight: torch.Tensor, mode: object, r: int, scaling: float, source: nn.Module | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A: (r, in), B: (out, r), residual: (out, in))`` for PiSSA / OLoRA / MiCA / LoftQ from
    ``weight: (out, in)`` (float32); ``residual`` replaces the base weight."""
    key = _weight_init_key(mode)
    assert key is not None
    if key[0] in _DATA_INITS:  # CorDA / LoRA-GA: what their preprocessing attached to the base layer ``source``
        assert source is not None
        return _DATA_INITS[key[0]](source, weight, r, scaling, key[1])
    return _WEIGHT_INITS[key[0]](weight, r, scaling, key[1])


#: the ``init_lora_weights`` values peftkit implements today (plus ``pissa_niter_<k>``)
SUPPORTED_INITS = (*_LINEAR_INITS, "pissa", "olora", "mica", "loftq", *_DATA_INITS)


def is_supported_init(mode: object) -> bool:
    """Is ``init_lora_weights=mode`` implemented by peftkit?"""
    mode = canonical_init(mode)
    return any(mode is m or (isinstance(mode, str) and mode == m) for m in _LINEAR_INITS) or uses_base_weight(mode)


def mark_frozen_weights(layer: nn.Module, adapter_name: str, mode: object) -> None:
    """Record on ``layer`` the weights of ``adapter_name`` that :meth:`AdapterLayer.set_adapter` keeps frozen
    (``layer.frozen_peft_weight_names: {adapter: (attribute, ...)}``, the reference's attribute)."""
    names: dict[str, tuple[str, ...]] = vars(layer).setdefault("frozen_peft_weight_names", {})
    frozen = frozen_weights(mode)
    if frozen:
        names[adapter_name] = frozen
    else:
        names.pop(adapter_name, None)
