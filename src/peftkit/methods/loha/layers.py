"""LoHa layers: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r`` on nn.Linear, nn.Conv1d and nn.Conv2d."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..lycoris import LycorisLayer


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


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
        return (w1a @ w1b) * (w2a @ w2b)
