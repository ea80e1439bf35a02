"""GLoRA layers: a generalised update of a frozen ``nn.Linear``'s weight and bias.

For ``W: (out, in)``, ``b: (out,)`` and the adapter's support tensors ``A``, ``B`` (broadcastable to ``(out, in)``),
``C`` (``(in, 1)``), ``D``, ``E`` (broadcastable to ``(out,)``):

    ``W' = W + W ⊙ A + B``,  ``b' = b + b ⊙ D + E + (W C)[:, 0]``,  ``y = x W'ᵀ + b'``.

Several active adapters add their updates, each computed against the original ``W`` / ``b`` (the reference's
``base + Σ (adapted_i - base)``). Each support tensor is a path module held in ``glora_A`` ... ``glora_E`` with the
reference's parameter names: ``Xd: (rows, r)`` / ``Xu: (r, cols)`` (``"lora"``), ``X`` (``"vector"``, ``"constant"``)
or the frozen buffer ``zeros`` (``"none"``, saved as the reference saves it).

Forward: ``W'`` is formed once per call with two fused ops (``addmm`` for a low-rank ``B``, then ``addcmul`` for
``W ⊙ A``) and the layer computes ``x W'ᵀ + b'`` with ONE matmul. The reference runs the base layer and the adapted
linear and subtracts (two matmuls forward, three backward, about five ``(out, in)`` temporaries); the results agree up
to rounding. While training (grad enabled, eager), :func:`.fused.glora_linear` also avoids keeping ``W'`` for backward
(it is rebuilt there from the small supports).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import MergeError
from ...injection.apply import defer_init, skip_random_init
from ...layers.base import AdapterLayer
from ...layers.dispatch import inplace_safe
from .fused import Support, build_weight, glora_linear


class GloraPath(nn.Module):
    """One support tensor of a GLoRA adapter; ``forward()`` returns it (broadcastable to its target's shape)."""

    def reset_parameters(self, init_weights: bool) -> None:
        """Initialise as the reference: identity (zeros) when ``init_weights``, else random."""

    def factors(self) -> Support:
        """The tensor as factors for :func:`~.fused.build_weight`: ``(Xd, Xu)`` or the single broadcastable tensor."""
        return tuple(self.parameters()) or tuple(self.buffers())


class GloraLoraPath(GloraPath):
    """``Xd @ Xu: (rows, cols)`` with ``Xd: (rows, r)`` (zeros at init) and ``Xu: (r, cols)`` (kaiming uniform)."""

    def __init__(self, rows: int, cols: int, r: int, **factory: Any) -> None:
        super().__init__()
        self.Xd = nn.Parameter(torch.empty(rows, r, **factory))
        self.Xu = nn.Parameter(torch.empty(r, cols, **factory))

    def reset_parameters(self, init_weights: bool) -> None:
        nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.Xd)
        else:
            nn.init.kaiming_uniform_(self.Xd, a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        return self.Xd @ self.Xu


class GloraVectorPath(GloraPath):
    """``X: (features, 1)`` (a column, broadcast over the inputs) or ``X: (features,)``."""

    def __init__(self, features: int, is_column: bool, **factory: Any) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.empty((features, 1) if is_column else (features,), **factory))

    def reset_parameters(self, init_weights: bool) -> None:
        if init_weights:
            nn.init.zeros_(self.X)
        else:  # the reference: fan_in 1 for a column, ``features`` for a flat vector
            with torch.no_grad():
                view = self.X.unsqueeze(0) if self.X.dim() == 1 else self.X
                nn.init.kaiming_uniform_(view, a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        return self.X


class GloraScalarPath(GloraPath):
    """One trained scalar ``X: (1,)``; ``forward()`` returns it as a 0-d tensor."""

    def __init__(self, **factory: Any) -> None:
        super().__init__()
        self.X = nn.Parameter(torch.empty(1, **factory))

    def reset_parameters(self, init_weights: bool) -> None:
        if init_weights:
            nn.init.zeros_(self.X)
        else:
            nn.init.normal_(self.X, mean=0.0, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.X[0]


class GloraEmptyPath(GloraPath):
    """A disabled support tensor: the frozen persistent buffer ``zeros`` of the target's shape (saved)."""

    def __init__(self, shape: tuple[int, ...], **factory: Any) -> None:
        super().__init__()
        self.register_buffer("zeros", torch.empty(shape, **factory))

    def reset_parameters(self, init_weights: bool) -> None:
        nn.init.zeros_(self.zeros)

    def forward(self) -> torch.Tensor:
        return self.zeros


def _make_paths(mode_A_B: str, mode_C: str, mode_D_E: str, out: int, inp: int, r: int, has_bias: bool,
                **factory: Any) -> list[GloraPath]:
    """The five paths ``[A, B, C, D, E]`` of one adapter for ``W: (out, in)`` (the reference's shapes)."""
    def a_b() -> GloraPath:
        if mode_A_B == "lora":
            return GloraLoraPath(out, inp, r, **factory)
        if mode_A_B == "vector":
            return GloraVectorPath(out, True, **factory)
        if mode_A_B == "constant":
            return GloraScalarPath(**factory)
        return GloraEmptyPath((out, inp), **factory)

    def d_e() -> GloraPath:
        if has_bias and mode_D_E == "vector":
            return GloraVectorPath(out, False, **factory)
        if has_bias and mode_D_E == "constant":
            return GloraScalarPath(**factory)
        return GloraEmptyPath((out,), **factory)

    if has_bias and mode_C == "lora":
        c: GloraPath = GloraLoraPath(inp, 1, r, **factory)
    elif has_bias and mode_C == "vector":
        c = GloraVectorPath(inp, True, **factory)
    else:
        c = GloraEmptyPath((inp, 1), **factory)
    return [a_b(), a_b(), c, d_e(), d_e()]


def glora_bias(weight: torch.Tensor, bias: torch.Tensor,
               paths: Sequence[tuple[GloraPath, GloraPath, GloraPath]]) -> torch.Tensor:
    """``b + Σ_i (b ⊙ D_i + E_i + (W C_i)[:, 0]): (out,)`` for ``weight: (out, in)``, ``bias: (out,)`` and
    ``paths``: ``(C_i, D_i, E_i)`` triples, the supports cast to ``weight``'s dtype."""
    acc = bias
    for path_C, path_D, path_E in paths:
        C, D, E = (p().to(weight.dtype) for p in (path_C, path_D, path_E))
        acc = acc + bias * D + E + (weight @ C).squeeze(-1)
    return acc


class GloraLayer(AdapterLayer):
    """GLoRA on a plain ``nn.Linear`` (reference attribute names: ``glora_A`` ... ``glora_E``, ``r``)."""

    adapter_layer_names = ("glora_A", "glora_B", "glora_C", "glora_D", "glora_E")
    other_param_names = ("r",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ModuleDict({}))
        self.r: dict[str, int] = {}
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self._plain = inplace_safe(base)  # the base forward is exactly F.linear: fold it into the adapted matmul

    def update_layer(self, adapter_name: str, r: int, config_A_B: str, config_C: str, config_D_E: str,
                     init_weights: bool, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``adapter_name`` in ``dtype`` (default: the base weight's) with the reference's paths."""
        weight = self.get_base_layer().weight
        deferred = skip_random_init()  # a load fills the tensors: never draw them
        factory = {"dtype": dtype or weight.dtype, "device": "meta" if deferred else weight.device}
        paths = _make_paths(config_A_B, config_C, config_D_E, self.out_features, self.in_features, r,
                            self.bias is not None, **factory)
        self.r[adapter_name] = r
        for attr, path in zip(self.adapter_layer_names, paths):
            if not deferred:
                path.reset_parameters(init_weights)
            getattr(self, attr)[adapter_name] = path
        if deferred:  # parameters and the zero buffers: zeroed on exit unless loaded
            defer_init([t for p in paths for t in (*p.parameters(), *p.buffers())], weight.device)
        self.set_adapter(self._active_adapter or [adapter_name])

    # ------------------------------------------------------------------ math
    def effective_weight(self, names: Sequence[str], weight: torch.Tensor | None = None) -> torch.Tensor:
        """``W' = W + Σ (W ⊙ A + B): (out, in)`` over adapters ``names`` (``weight``: default the base weight)."""
        weight = self.weight if weight is None else weight
        return build_weight(weight, self._supports(names))

    def _supports(self, names: Sequence[str]) -> list[tuple[Support, Support]]:
        return [(self.glora_A[n].factors(), self.glora_B[n].factors()) for n in names]

    def effective_bias(self, names: Sequence[str], weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """``b' = b + Σ (b ⊙ D + E + W C): (out,)`` over adapters ``names``; None when the base has no bias."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        if bias is None:
            return None
        return glora_bias(weight, bias, [(self.glora_C[n], self.glora_D[n], self.glora_E[n]) for n in names])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W ⊙ A + B: (out, in)`` against the current base weight, in its dtype."""
        return self.effective_weight([adapter_name]) - self.weight

    def get_delta_bias(self, adapter_name: str) -> torch.Tensor | None:
        """``b ⊙ D + E + W C: (out,)`` against the current base weights; None without a base bias."""
        bias = self.effective_bias([adapter_name])
        return None if bias is None else bias - self.bias

    def _adapted(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """``x W'ᵀ + b': (..., out)`` for ``x: (..., in)`` with the adapters ``names`` applied."""
        weight = self.effective_weight(names)
        return F.linear(x.to(weight.dtype), weight, self.effective_bias(names))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x: (..., in) -> (..., out)``: the adapted linear (one matmul when the base is a plain ``nn.Linear``)."""
        if self._disable_adapters:
            return self._base_forward(x, *args, **kwargs)
        names = self._forward_adapters
        if self._row_adapters is not None:
            return self.mixed_replace(x, self.base_layer(x, *args, **kwargs),
                                      lambda name, xs: self._adapted(xs, (name,)))
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if self._plain:
            weight = self.weight
            if torch.is_grad_enabled() and not weight.requires_grad and not torch.compiler.is_compiling():
                # training: the same math, without keeping W' for backward (fused.py)
                x_w = x.to(weight.dtype)
                return glora_linear(x_w, weight, self.effective_bias(names), self._supports(names)).to(x.dtype)
            return self._adapted(x, names).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)  # hooked base: keep its forward, add the update
        delta = self._adapted(x, names) - F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return result + delta.to(result.dtype)

    # ------------------------------------------------------------------ merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge ``adapter_names`` (default: the active adapters) into the base weights. As the reference, every
        merged adapter's update is computed against the original ``W``/``b``: already merged adapters are unmerged
        first and merged again together. ``safe_merge``: a :class:`MergeError` on NaN/inf, weights untouched."""
        names = self._adapters_to_merge(adapter_names)
        if not names:
            return
        previous = list(self.merged_adapters)
        if previous:
            self.unmerge()
        names = previous + names
        base = self.get_base_layer()
        with torch.no_grad():
            weight = self.effective_weight(names, base.weight.detach())
            bias = self.effective_bias(names, base.weight.detach(), None if base.bias is None else base.bias.detach())
        for tensor in (weight, bias):
            if safe_merge and tensor is not None and not torch.isfinite(tensor).all():
                raise MergeError(f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to be "
                                 "broken")
        base.weight.data = weight.to(base.weight.dtype)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
        self.merged_adapters[:] = names
        self._refresh()

    def unmerge(self) -> None:
        """Restore the original weights from the merged ones (the reference's inversion):
        ``W = (W_m - Σ B) / (1 + Σ A)``, then ``b = (b_m - Σ E - Σ W C) / (1 + Σ D)``."""
        if not self.merged_adapters:
            return
        base = self.get_base_layer()
        names = list(self.merged_adapters)
        dtype = base.weight.dtype
        with torch.no_grad():
            sum_A = sum(self.glora_A[n]().to(dtype) for n in names)
            sum_B = sum(self.glora_B[n]().to(dtype) for n in names)
            weight = (base.weight - sum_B) / (1.0 + sum_A)
            if base.bias is not None:
                sum_D = sum(self.glora_D[n]().to(dtype) for n in names)
                sum_E = sum(self.glora_E[n]().to(dtype) for n in names)
                sum_WC = sum((weight @ self.glora_C[n]().to(dtype)).squeeze(-1) for n in names)
                base.bias.data = (base.bias - sum_E - sum_WC) / (1.0 + sum_D)
            base.weight.data = weight
        self.merged_adapters.clear()
        self._refresh()
