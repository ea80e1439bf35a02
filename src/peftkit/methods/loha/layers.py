"""LoHa layers: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r`` on nn.Linear, nn.Conv1d and nn.Conv2d."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..lycoris import LycorisLayer


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def hada_product_plain(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
    """``(w1a @ w1b) ⊙ (w2a @ w2b)``: ``w*a: (out, r)``, ``w*b: (r, cols)`` -> ``(out, cols)``. The plain definition
    (autograd keeps both ``(out, cols)`` products for backward); :func:`hada_product` is the lean one."""
    return (w1a @ w1b) * (w2a @ w2b)


class _HadaProduct(torch.autograd.Function):
    """:func:`hada_product_plain` keeping only the four factors for backward; the backward recomputes the two
    ``(out, cols)`` products (two rank-``r`` matmuls) instead of holding them from forward to backward, as the
    reference's ``HadaWeight`` does. Per adapted layer that is two weight-sized tensors less memory in training."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                w2b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return hada_product_plain(w1a, w1b, w2a, w2b)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        """``grad: (out, cols)`` -> gradients of ``w1a, w1b, w2a, w2b``: with ``P_i = w_ia @ w_ib``,
        ``d w1a = (grad ⊙ P_2) @ w1bᵀ``, ``d w1b = w1aᵀ @ (grad ⊙ P_2)``, and likewise for the second pair."""
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        need = ctx.needs_input_grad
        g1a = g1b = g2a = g2b = None
        if need[0] or need[1]:
            temp = grad * (w2a @ w2b)
            g1a = temp @ w1b.t() if need[0] else None
            g1b = w1a.t() @ temp if need[1] else None
            del temp
        if need[2] or need[3]:
            temp = grad * (w1a @ w1b)
            g2a = temp @ w2b.t() if need[2] else None
            g2b = w2a.t() @ temp if need[3] else None
        return g1a, g1b, g2a, g2b


def hada_product(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
    """:func:`hada_product_plain` with a lean backward (:class:`_HadaProduct`) when a gradient is needed."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (w1a, w1b, w2a, w2b)):
        return _HadaProduct.apply(w1a, w1b, w2a, w2b)
    return hada_product_plain(w1a, w1b, w2a, w2b)


class LoHaLayer(LycorisLayer):
    """Holds LoHa adapters (``ParameterDict`` entries saved as ``hada_w1_a`` etc., without ``.weight``)."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def update_layer(self, adapter_name: str, r: int, alpha: float, config: object,
                     dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``. Shapes (reference): Linear ``w*_a: (out, r)``, ``w*_b: (r, in)``;
        conv ``(out, in·k)`` flattened likewise, or with ``use_effective_conv2d`` (kernel > 1)
        ``t*: (r, r, k1, k2)``, ``w*_a: (r, out)``, ``w*_b: (r, in)``."""
        self._set_hparams(adapter_name, r, alpha, config)
        base = self.get_base_layer()
        out_dim = base.weight.shape[0]
        effective = False
        if isinstance(base, nn.Linear):
            in_dim, kernel = base.in_features, ()
        else:
            in_dim, kernel = base.in_channels // base.groups, tuple(base.kernel_size)
            effective = bool(config.use_effective_conv2d) and any(k != 1 for k in kernel)  # type: ignore[attr-defined]
        empty, deferred = self._factory()
        if effective:
            k2 = kernel if len(kernel) == 2 else (kernel[0], 1)
            self.hada_t1[adapter_name] = nn.Parameter(empty(r, r, *k2))
            self.hada_t2[adapter_name] = nn.Parameter(empty(r, r, *k2))
            self.hada_w1_a[adapter_name] = nn.Parameter(empty(r, out_dim))
            self.hada_w1_b[adapter_name] = nn.Parameter(empty(r, in_dim))
            self.hada_w2_a[adapter_name] = nn.Parameter(empty(r, out_dim))
            self.hada_w2_b[adapter_name] = nn.Parameter(empty(r, in_dim))
        else:
            cols = in_dim * math.prod(kernel)
            self.hada_w1_a[adapter_name] = nn.Parameter(empty(out_dim, r))
            self.hada_w1_b[adapter_name] = nn.Parameter(empty(r, cols))
            self.hada_w2_a[adapter_name] = nn.Parameter(empty(out_dim, r))
            self.hada_w2_b[adapter_name] = nn.Parameter(empty(r, cols))
        if deferred:
            self._finish_update(adapter_name, dtype, deferred)
            return
        with torch.no_grad():
            _kaiming(self.hada_w1_a[adapter_name])
            _kaiming(self.hada_w1_b[adapter_name])
            _kaiming(self.hada_w2_a[adapter_name])
            if config.init_weights:  # type: ignore[attr-defined]
                nn.init.zeros_(self.hada_w2_b[adapter_name])  # identity at init
            else:
                _kaiming(self.hada_w2_b[adapter_name])
            if effective:
                _kaiming(self.hada_t1[adapter_name])
                _kaiming(self.hada_t2[adapter_name])
        self._finish_update(adapter_name, dtype)

    def _raw_delta(self, name: str) -> torch.Tensor:
        w1a, w1b = self.hada_w1_a[name], self.hada_w1_b[name]
        w2a, w2b = self.hada_w2_a[name], self.hada_w2_b[name]
        if name in self.hada_t1:
            # CP: rebuild[p, r, k, l] = sum_ij t[i, j, k, l] * w_b[j, r] * w_a[i, p]
            rebuild1 = torch.einsum("ijkl,jr,ip->prkl", self.hada_t1[name], w1b, w1a)
            rebuild2 = torch.einsum("ijkl,jr,ip->prkl", self.hada_t2[name], w2b, w2a)
            return rebuild1 * rebuild2
        return hada_product(w1a, w1b, w2a, w2b)
