"""LoRA-FA (https://huggingface.co/papers/2308.03303): A frozen, B trained with a projected AdamW step.

The gradient of ``B`` is projected as in the paper, ``g_B' = g_B (A A^T + δI)^+ / s^2`` with ``s`` the adapter's
scaling, and an AdamW (transformers' ``adamw-hf``) step uses it. Parameters that are not
LoRA factor pairs get the plain AdamW step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..errors import ConfigError, PeftError

#: added to ``A A^T`` before the pseudo-inverse (the reference's value)
_DELTA = 1e-8


def _check_hyper(lr: float, betas: tuple[float, float], eps: float) -> None:
    if lr < 0.0:
        raise ConfigError("lr", lr, "allowed: >= 0.0")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"betas[{i}]", beta, "allowed: in [0.0, 1.0)")
    if eps < 0.0:
        raise ConfigError("eps", eps, "allowed: >= 0.0")


def _pair_of(name: str) -> tuple[str, str] | None:
    """``(key, "A" | "B")`` for ``<layer>.lora_A.<adapter>.weight`` / ``lora_B`` names, else None; ``key`` is
    shared by the two factors of one adapter."""
    for part in ("A", "B"):
        marker = f".lora_{part}."
        if marker in name and name.endswith(".weight"):
            return name.replace(marker, ".lora_*."), part
    return None


def _adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                  m_key: str, v_key: str) -> None:
    """One transformers-``adamw-hf`` step of ``param`` with ``grad``, decoupled weight decay after it."""
    beta1, beta2 = group["betas"]
    state["step"] += 1
    m, v = state[m_key], state[v_key]
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = v.sqrt().add_(group["eps"])
    step_size = group["lr"]
    if group["correct_bias"]:
        step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
    param.addcdiv_(m, denom, value=-step_size)
    if group["weight_decay"] > 0.0:
        param.add_(param, alpha=-group["lr"] * group["weight_decay"])


def projected_b_grad(A: torch.Tensor, grad_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA-FA's gradient of ``B``: ``grad_B (A A^T + δI)^+ / scaling^2``.

    Args:
        A: ``(r, in)``, frozen.
        grad_B: ``(out, r)``.
        scaling: the adapter's ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``).

    Returns:
        ``(out, r)`` in ``grad_B``'s dtype (computed in float32 for half-precision inputs).
    """
    work = torch.float32 if grad_B.dtype in (torch.float16, torch.bfloat16) else grad_B.dtype
    A_w = A.reshape(A.shape[0], -1).to(work)
    gram = A_w @ A_w.T + _DELTA * torch.eye(A_w.shape[0], device=A.device, dtype=work)  # (r, r)
    return ((grad_B.to(work) @ torch.linalg.pinv(gram)) / scaling**2).to(grad_B.dtype)


class LoraFAOptimizer(Optimizer):
    """AdamW (transformers' ``adamw-hf``) with LoRA-FA's projected update of each adapter's ``B``.

    Each param group needs ``names`` (parameter names, as ``model.named_parameters()``) and ``scaling_factors``
    (the adapter scaling per parameter, None for non-LoRA parameters), as built by
    :func:`create_lorafa_optimizer`. ``lora_A.<adapter>.weight`` and ``lora_B.<adapter>.weight`` of one layer are
    paired by name; ``A`` is never updated.

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0).
        betas: running-average coefficients, each in [0, 1).
        eps: added to the denominator (>= 0).
        weight_decay: decoupled weight decay.
        correct_bias: Adam's bias correction.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        _check_hyper(lr, betas, eps)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)
        self._legacy_scaling_factor_warned = False

    def _scalings(self, group: dict[str, Any]) -> list[float | None]:
        if "scaling_factors" in group:
            return list(group["scaling_factors"])
        if "scaling_factor" in group:
            if not self._legacy_scaling_factor_warned:
                warnings.warn("`scaling_factor` is deprecated and will be removed after 2026-11-01. "
                              "Please use `scaling_factors` instead.", FutureWarning, stacklevel=3)
                self._legacy_scaling_factor_warned = True
            return [group["scaling_factor"]] * len(group["params"])
        raise LoraFAGroupError("Expected optimizer param group to define `scaling_factors` (one per parameter, "
                               "None for non-LoRA parameters), as create_lorafa_optimizer builds it")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if "names" not in group:
                raise LoraFAGroupError("Expected optimizer param group to define `names` (one per parameter)")
            scalings = self._scalings(group)
            factors: dict[str, dict[str, tuple[torch.Tensor, float | None]]] = {}
            for param, name, scaling in zip(group["params"], group["names"], scalings):
                pair = _pair_of(name)
                if pair is not None:
                    factors.setdefault(pair[0], {})[pair[1]] = (param, scaling)
                elif param.grad is not None:
                    self._plain_step(param, group)
            for pair in factors.values():
                self._pair_step(pair, group)
        return loss

    def _plain_step(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        _adamw_update(param, param.grad, state, group, "exp_avg", "exp_avg_sq")

    def _pair_step(self, pair: dict[str, tuple[torch.Tensor, float | None]], group: dict[str, Any]) -> None:
        if "A" not in pair or "B" not in pair:  # a lone factor: an ordinary parameter
            for param, _ in pair.values():
                if param.grad is not None:
                    self._plain_step(param, group)
            return
        (A, _), (B, scaling) = pair["A"], pair["B"]
        if B.grad is None:
            return
        state = self.state[B]
        if not state:
            state.update(step=0, exp_avg_B=torch.zeros_like(B), exp_avg_sq_B=torch.zeros_like(B))
        grad_B = projected_b_grad(A, B.grad, 1.0 if scaling is None else scaling)
        _adamw_update(B, grad_B, state, group, "exp_avg_B", "exp_avg_sq_B")


class LoraFAGroupError(PeftError, KeyError):
    """A LoRA-FA param group lacks ``names`` or ``scaling_factors`` (a ``KeyError``, as the reference raises)."""

    __str__ = Exception.__str__


def _rslora_flag(model: nn.Module, use_rslora: bool | None) -> bool:
    """Whether the scaling of the active adapters is rsLoRA's (``use_rslora`` is deprecated, checked)."""
    configs = getattr(model, "peft_config", {}) or {}
    active = [a for a in getattr(model, "active_adapters", []) if a in configs]
    flags = {a: bool(getattr(configs[a], "use_rslora", False)) for a in active}
    if use_rslora is None:
        return all(flags.values()) if flags else False
    mismatched = [a for a, flag in flags.items() if flag != use_rslora]
    if mismatched:
        raise ConfigError("use_rslora", use_rslora,
                          f"the active adapters {mismatched} set use_rslora differently in their config; configure "
                          "rsLoRA via LoraConfig and leave the deprecated use_rslora argument out")
    warnings.warn("`use_rslora` in create_lorafa_optimizer is deprecated and will be removed after 2026-11-01. "
                  "Please configure rsLoRA via LoraConfig instead.", FutureWarning, stacklevel=3)
    return use_rslora


def _scaling_of(model: nn.Module, name: str) -> float | None:
    """The scaling of the LoRA adapter holding parameter ``name`` (``<layer>.lora_X.<adapter>...``), else None."""
    if ".lora_" not in name:
        return None
    layer_name, _, suffix = name.rpartition(".lora_")
    parts = suffix.split(".")
    if len(parts) < 2:
        return None
    scaling = getattr(model.get_submodule(layer_name), "scaling", None)
    return scaling.get(parts[1]) if isinstance(scaling, dict) else None


def create_lorafa_optimizer(
    model: nn.Module,
    r: int,
    lora_alpha: int,
    lr: float,
    weight_decay: float = 0.0,
    use_rslora: bool | None = None,
) -> Optimizer:
    """A :class:`LoraFAOptimizer` over every parameter of ``model`` (a LoRA ``PeftModel``); freezes every ``lora_A``.

    One param group: ``lr``, ``weight_decay``, ``betas=(0.9, 0.999)``, the parameter ``names``, their adapter
    ``scaling_factors`` (None for non-LoRA parameters) and the legacy ``scaling_factor = lora_alpha / r``
    (rsLoRA: ``/ sqrt(r)``), as the reference builds it.

    Raises:
        ConfigError: the deprecated ``use_rslora`` disagrees with an active adapter's config (a ``ValueError``).
    """
    rslora = _rslora_flag(model, use_rslora)
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    named = list(model.named_parameters())
    group = {
        "params": [param for _, param in named],
        "lr": lr,
        "names": [name for name, _ in named],
        "scaling_factors": [_scaling_of(model, name) for name, _ in named],
        "scaling_factor": lora_alpha / math.sqrt(r) if rslora else lora_alpha / r,
        "betas": (0.9, 0.999),
        "weight_decay": weight_decay,
    }
    return LoraFAOptimizer([group])
