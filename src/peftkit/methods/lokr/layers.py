"""LoKr layers: ``ΔW = kron(w1, w2) · alpha / r`` on nn.Linear, nn.Conv1d and nn.Conv2d."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..lycoris import LycorisLayer


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n`` (the reference's / LyCORIS' rule).

    ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)``. Otherwise the divisor pair closest
    to the square root whose smaller part does not exceed ``factor`` (``-1``: no limit), e.g. 128 -> (8, 16).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        m, n = n, m
    return m, n


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoKrLayer(LycorisLayer):
    """Holds LoKr adapters (``ParameterDict`` entries saved as ``lokr_w1`` etc., without ``.weight``)."""

    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def update_layer(self, adapter_name: str, r: int, alpha: float, config: object,
                     dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name``: ``out = a·b``, ``in = c·d`` (``factorization``); ``w1: (a, c)`` or
        ``w1_a: (a, r) @ w1_b: (r, c)``; ``w2: (b, d, *kernel)``, or ``w2_a: (b, r) @ w2_b: (r, d·k)``, or with
        ``use_effective_conv2d`` ``t2: (r, r, k1, k2)``, ``w2_a: (r, b)``, ``w2_b: (r, d)``."""
        self._set_hparams(adapter_name, r, alpha, config)
        base = self.get_base_layer()
        factor = config.decompose_factor  # type: ignore[attr-defined]
        if isinstance(base, nn.Linear):
            in_dim, out_dim, kernel = base.in_features, base.out_features, ()
        else:
            in_dim, out_dim, kernel = base.in_channels // base.groups, base.out_channels, tuple(base.kernel_size)
        a, b = factorization(out_dim, factor)
        c, d = factorization(in_dim, factor)
        use_w1 = not (config.decompose_both and r < max(a, c) / 2)  # type: ignore[attr-defined]
        use_w2 = r >= max(b, d) / 2
        effective = bool(kernel) and bool(config.use_effective_conv2d) and any(k != 1 for k in kernel)  # type: ignore[attr-defined]
        empty, deferred = self._factory()
        if use_w1:
            self.lokr_w1[adapter_name] = nn.Parameter(empty(a, c))
        else:
            self.lokr_w1_a[adapter_name] = nn.Parameter(empty(a, r))
            self.lokr_w1_b[adapter_name] = nn.Parameter(empty(r, c))
        if use_w2:
            self.lokr_w2[adapter_name] = nn.Parameter(empty(b, d, *kernel))
        elif effective:
            k2 = kernel if len(kernel) == 2 else (kernel[0], 1)
            self.lokr_t2[adapter_name] = nn.Parameter(empty(r, r, *k2))
            self.lokr_w2_a[adapter_name] = nn.Parameter(empty(r, b))
            self.lokr_w2_b[adapter_name] = nn.Parameter(empty(r, d))
        else:
            self.lokr_w2_a[adapter_name] = nn.Parameter(empty(b, r))
            self.lokr_w2_b[adapter_name] = nn.Parameter(empty(r, d * math.prod(kernel)))
        if not deferred:
            self._init(adapter_name, config.init_weights)  # type: ignore[attr-defined]
        self._finish_update(adapter_name, dtype, deferred)

    @torch.no_grad()
    def _init(self, name: str, init_weights: bool | str) -> None:
        """True: ``w1`` (or ``w1_a``) zero, the rest Kaiming-uniform; ``"lycoris"``: ``w2`` (or ``w2_b``) zero;
        False: all Kaiming-uniform (non-identity)."""
        zero_w1 = init_weights is True
        zero_w2 = init_weights == "lycoris"
        if name in self.lokr_w1:
            (nn.init.zeros_ if zero_w1 else _kaiming)(self.lokr_w1[name])
        else:
            (nn.init.zeros_ if zero_w1 else _kaiming)(self.lokr_w1_a[name])
            _kaiming(self.lokr_w1_b[name])
        if name in self.lokr_w2:
            (nn.init.zeros_ if zero_w2 else _kaiming)(self.lokr_w2[name])
        else:
            if zero_w2:  # reference order: w2_b zeroed first, then w2_a
                nn.init.zeros_(self.lokr_w2_b[name])
                _kaiming(self.lokr_w2_a[name])
            else:
                _kaiming(self.lokr_w2_a[name])
                _kaiming(self.lokr_w2_b[name])
        if name in self.lokr_t2:
            _kaiming(self.lokr_t2[name])

    def _raw_delta(self, name: str) -> torch.Tensor:
        if name in self.lokr_w1:
            w1 = self.lokr_w1[name]
        else:
            w1 = self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return torch.kron(w1, w2.contiguous())
