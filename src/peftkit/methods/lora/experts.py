"""LoRA on the experts of transformers' mixture-of-experts blocks, applied on the routed tokens.

transformers 5 builds its experts modules (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GLM4-MoE, Qwen3-Next,
gpt-oss, Phi-MoE, ...) with ``@use_experts_implementation``: the module holds ``gate_up_proj`` (or ``up_proj``) and
``down_proj`` as ``(E, ...)`` parameters and describes itself with ``num_experts``, ``has_gate``, ``has_bias``,
``is_transposed``, ``_apply_gate``, ``act_fn`` and ``has_post_expert_norm``; its forward takes
``(hidden_states: (T, h), top_k_index: (T, k), top_k_weights: (T, k))``.

For such a module, :func:`routed_forward` computes the experts' output the way their eager forward does (tokens
grouped by expert) and adds each adapter's ``scaling · (x @ A_eᵀ) @ B_eᵀ`` to expert ``e``'s projection of its own
tokens ``x``: a rank-``r`` update costs two thin matmuls per expert, instead of forming ``W + ΔW`` for all experts
on every forward (and its gradient, the size of all experts, in backward) as the reference does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...ops.grouped import grouped_matmul

if TYPE_CHECKING:
    from .param import ParamLayer

#: the attributes ``use_experts_implementation`` gives an experts module
_DESCRIBED = ("num_experts", "has_gate", "has_bias", "is_transposed", "_apply_gate")
_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def is_routed_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module whose computation :func:`routed_forward` reproduces."""
    if not all(hasattr(module, name) for name in _DESCRIBED) or getattr(module, "_is_expert_parallel", False):
        return False
    first = "gate_up_proj" if module.has_gate else "up_proj"
    return all(isinstance(getattr(module, name, None), torch.Tensor) and getattr(module, name).dim() == 3
               for name in (first, "down_proj"))


def routed_forward(module: nn.Module, layers: dict[str, ParamLayer], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The output ``(T, h)`` of the experts ``module`` with the adapters of ``layers`` (``{parameter name: layer}``)
    applied on the routed tokens; None when ``module`` is not such an experts module or an adapted parameter is
    not one of its projections (the caller then materialises ``W + ΔW``)."""
    if not is_routed_experts(module) or not set(layers) <= set(_PROJECTIONS):
        return None
    inputs = _routing_inputs(args, kwargs)
    if inputs is None:
        return None
    hidden, top_k_index, top_k_weights = inputs
    return experts_forward(module, hidden, top_k_index, top_k_weights, layers)


def _routing_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
    """``(hidden_states, top_k_index, top_k_weights)`` from the call, positional or by name (gpt-oss names them
    ``router_indices`` / ``routing_weights``); None for any other call."""
    names = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
    values = list(args)
    rest = dict(kwargs)
    for aliases in names[len(values):]:
        key = next((a for a in aliases if a in rest), None)
        if key is None:
            return None
        values.append(rest.pop(key))
    if rest or len(values) != 3 or not all(isinstance(v, torch.Tensor) for v in values):
        return None
    return tuple(values)


def experts_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, layers: dict[str, ParamLayer]) -> torch.Tensor:
    """``hidden: (T, h)``, ``top_k_index: (T, k)`` int, ``top_k_weights: (T, k)`` -> ``(T, h)``.

    The ``S = T·k`` (token, expert) pairs are sorted by expert once (one gather of the tokens), so each expert's
    rows are a contiguous group: ``up = x·W_up[e] (+ b) + LoRA``, the gate (``module._apply_gate``, row-wise) or
    activation, ``down = up·W_down[e] (+ b) + LoRA``, the optional post-expert norm; then the routing weights, the
    original pair order and a sum per token (as transformers' grouped implementation). Each projection and each
    low-rank factor is one grouped matmul over all experts (``torch.nn.functional.grouped_mm``; a loop over the
    groups where torch has none)."""
    tokens, top_k = top_k_index.shape
    with torch.no_grad():
        pairs = top_k_index.reshape(-1)
        order = torch.argsort(pairs, stable=True)  # (S,)
        counts = torch.bincount(pairs, minlength=module.num_experts)
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        experts = pairs[order]  # (S,) expert of each grouped row
    x = hidden[order // top_k]  # (S, h)
    first = "gate_up_proj" if module.has_gate else "up_proj"
    up = _projection(module, first, x, offsets, experts, layers.get(first))
    up = module._apply_gate(up) if module.has_gate else module.act_fn(up)
    down = _projection(module, "down_proj", up, offsets, experts, layers.get("down_proj"))
    if getattr(module, "has_post_expert_norm", False):
        down = module.post_expert_norm(down)
    weighted = down * top_k_weights.reshape(-1)[order].unsqueeze(-1)  # (S, h)
    return weighted[inverse].view(tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


def _projection(module: nn.Module, name: str, x: torch.Tensor, offsets: torch.Tensor, experts: torch.Tensor,
                layer: ParamLayer | None) -> torch.Tensor:
    """``x: (S, in)`` grouped by expert -> ``(S, out)``: the experts' projection ``name`` (stored ``(E, out, in)``,
    or ``(E, in, out)`` when ``module.is_transposed``), its bias, and ``scaling · (x A_eᵀ) B_eᵀ`` per adapter."""
    weight = getattr(module, name)
    y = grouped_matmul(x, weight if module.is_transposed else weight.transpose(1, 2), offsets)
    if module.has_bias:
        y = y + getattr(module, name + "_bias")[experts]
    for adapter in (layer._forward_adapters if layer is not None else ()):
        A, B = layer.expert_factors(adapter)  # (E, r, in), (E, out, r)
        hidden = grouped_matmul(x.to(A.dtype), A.transpose(1, 2), offsets) * layer.scaling[adapter]  # (S, r)
        update = grouped_matmul(hidden, B.transpose(1, 2).contiguous(), offsets).to(y.dtype)
        y = y.add_(update)  # y: a fresh product (or sum) that no backward needs: added in place
    return y
